"""Data: labelled image tables and loaders (tables.py), images and preprocessing (images.py), EXIF GPS (exif.py),
the images to predict (prediction.py) and the offline demo dataset (demodata.py)."""
