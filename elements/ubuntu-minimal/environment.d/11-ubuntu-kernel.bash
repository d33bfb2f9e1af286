# Which kernel package-installs.yaml selects: linux-image-generic (default),
# linux-image-virtual, linux-image-kvm or linux-image-hwe.
export DIB_UBUNTU_KERNEL=${DIB_UBUNTU_KERNEL:-linux-image-generic}
