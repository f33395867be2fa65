"""`python -m fabric.cni`: the same as the `fabricd-cni` console script."""

from fabric.cni.plugin import main

main()
