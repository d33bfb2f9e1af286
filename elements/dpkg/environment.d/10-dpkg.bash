# A folder of extra apt keys (files) to trust in the image; empty for none.
export DIB_ADD_APT_KEYS=${DIB_ADD_APT_KEYS:-}
