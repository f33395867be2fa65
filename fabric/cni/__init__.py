"""`fabricd-cni`: a CNI plugin that attaches containers to a fabric namespace through
the running daemon (spec.py: the CNI side, sans I/O; plugin.py: the process)."""
