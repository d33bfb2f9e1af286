# The install type of every element whose DIB_INSTALLTYPE_<element> is unset.
export DIB_DEFAULT_INSTALLTYPE=${DIB_DEFAULT_INSTALLTYPE:-source}
