"""The prepared GPU check: CUDA tests, a 7B-shape verification profile and projected speed-ups (README.md).

Not part of the installed package: it runs from the repository root, here (`prepare.py`, the CPU dry run of
`profile_gpu.py`) and on a lent GPU machine (`device_check.py`).
"""
