"""Stage 1: open slides with one interface, find tissue, lay a tile grid at a target µm/px (`gpfm tile`)."""

from gpfm.slides.reader import Slide, open_slide
from gpfm.slides.tiling import Coords, TilingParams, read_coords, read_tile, tile_slide, write_coords
from gpfm.slides.tissue import TissueParams, tissue_mask

__all__ = ["Coords", "Slide", "TilingParams", "TissueParams", "open_slide", "read_coords", "read_tile",
           "tile_slide", "tissue_mask", "write_coords"]
