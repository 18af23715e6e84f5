"""Whole georeferenced scenes: GeoTIFF pairs in; change, probability and explanation GeoTIFFs
and change polygons out, window by window in bounded memory (``python predict.py
input.pre=a.tif input.post=b.tif``).

* :mod:`~changecam.geo.grid`: open a pair, the post scene on the pre grid (WarpedVRT) or refused;
* :mod:`~changecam.geo.bands`: band selection and scaling to the network's uint8 input;
* :mod:`~changecam.geo.windows`: output blocks with their sliding-window halo, a reader thread;
* :mod:`~changecam.geo.write`: the rasters, block by block, renamed into place at the end;
* :mod:`~changecam.geo.polygons`: one polygon per changed region, with area, probability, post share;
* :mod:`~changecam.geo.scene`: the runner (:func:`predict_scene`).
"""

from changecam.geo.grid import Grid, SceneError, open_pair
from changecam.geo.scene import SceneSettings, is_scene_file, predict_scene

__all__ = ["Grid", "SceneError", "SceneSettings", "is_scene_file", "open_pair", "predict_scene"]
