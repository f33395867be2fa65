"""MicroVM pods: a tiny guest (Debian's kernel, a busybox initramfs) run by QEMU on a TAP
that the fabric attaches as an `interface:` pod, and its sleep and wake over QMP."""
