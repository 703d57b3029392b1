"""Text sources (data mirror first, hub second) and calibration window sampling."""
