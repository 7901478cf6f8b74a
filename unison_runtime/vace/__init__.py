"""Stage two: Wan2.1-VACE loading (every format), source preparation, sampling, decoding."""
