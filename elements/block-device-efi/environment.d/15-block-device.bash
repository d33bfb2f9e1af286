# Tell later hooks (bootloader) which disk layout this build uses.
case "${ARCH:-}" in
    ppc64|ppc64le|ppc64el)
        echo "block-device-efi is not supported on Power; use block-device-gpt or block-device-mbr" >&2
        exit 1
        ;;
esac
export DIB_BLOCK_DEVICE=efi
