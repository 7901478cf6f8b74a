"""Unison runtime: plan a free-form instruction, then answer it or generate the image or video.

Never imports ComfyUI; torch is imported only by the modules that run models, so planning
stays light. See DESIGN.md for the contract and README.md for the tour.
"""

__version__ = "0.1.0"
