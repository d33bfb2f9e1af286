# Tell later hooks (bootloader) which disk layout this build uses.
case "${ARCH:-}" in
    arm64|aarch64)
        echo "block-device-mbr is not supported on ${ARCH}; use block-device-efi" >&2
        exit 1
        ;;
esac
export DIB_BLOCK_DEVICE=mbr
