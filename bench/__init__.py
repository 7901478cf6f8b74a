"""Benchmarks (speed, memory), run by hand with ``python -m bench.<script>``; see BENCHMARKS.md."""
