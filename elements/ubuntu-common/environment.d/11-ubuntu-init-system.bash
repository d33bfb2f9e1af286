# Ubuntu has booted with systemd since 15.04; 14.04 (trusty) used upstart.
if [ "${DIB_RELEASE:-}" = trusty ]; then
    export DIB_INIT_SYSTEM=upstart
else
    export DIB_INIT_SYSTEM=systemd
fi
