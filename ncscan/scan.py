# TEMPORARY compatibility shim (removed before commit): the module is ncscan.scanner.
from .scanner import *  # noqa: F401,F403
from .scanner import Prepared, ScanReport, LabelResult, prepare, scan, build_report, encode_trigger, decode_trigger, resolve_device  # noqa: F401
