"""The ``serq`` command line (installed as ``serq_ao.cli``)."""
