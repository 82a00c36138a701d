"""``hrm doctor``: one command that checks a machine (typically a new GPU) end to end.

:func:`count_host_reads` counts the host reads of tensor data that a block of code makes.
"""

from hrm.doctor.host_reads import HostReads, count_host_reads

__all__ = ["HostReads", "count_host_reads"]
