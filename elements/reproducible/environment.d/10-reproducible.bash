# The reproducible element is in the build: strata's elements that honour DIB_REPRODUCIBLE
# (debootstrap's root.d/08-debootstrap, and this element's own hooks) leave nothing
# run-specific in the tree. Set DIB_REPRODUCIBLE=0 to switch the element off without removing it.
export DIB_REPRODUCIBLE=${DIB_REPRODUCIBLE:-1}
