# Suites added to sources.list as <release>-<dist>, comma separated.
export DIB_UBUNTU_MIRROR_DISTS=${DIB_UBUNTU_MIRROR_DISTS:-updates,security,backports}
