"""Suite-wide settings.

The NumPy backend's compiled-program tier (``backends/c_programs.py``) is off unless a test turns it
on for its own backend (``tests/test_c_programs.py``): the differential tests elsewhere compare the
op-by-op rules, and the suite does not spend its time compiling each test's programs.
"""

import os

os.environ.setdefault("MPDSL_C_PROGRAMS", "0")
