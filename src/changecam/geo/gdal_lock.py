"""One lock that the scene's reader, writer and tracer threads take around their GDAL calls.

GDAL's block cache is shared by every dataset of the process: a thread that needs room in it may
write out a dirty block of a dataset that another thread is writing at that moment (GDAL issue
#2011, made rarer but not impossible by its fix #2015, above all for pixel-interleaved multi-band
GeoTIFFs such as ``explanation.tif``). A 16384² scene here once failed with a broken write
(``_tiffWriteProc``) and an undecodable tile after about nine minutes, with the reader and the
writer thread both using GDAL. So they take turns (the tracer thread too, for GDAL's polygonize,
though it works on in-memory rasters, and for the PROJ transformations that tell whether the
grid's areas are metres): each still runs beside the network, which never calls GDAL.
"""

from __future__ import annotations

import threading

GDAL_LOCK = threading.Lock()

__all__ = ["GDAL_LOCK"]
