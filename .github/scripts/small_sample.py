"""Shrink params.yaml to the small CI sample: few demo subjects, small images, 1 epoch."""

import sys
from pathlib import Path

import yaml

path = Path(sys.argv[1])
params = yaml.safe_load(path.read_text())
params["base"]["image_size"] = [64, 64]
params["data"]["demo"] = {"subjects_per_class": [4, 4, 3, 3], "slices_per_subject": 8}
params["model"]["input_size"] = [64, 64]
params["train"].update({"epochs": 1, "fine_tune_epochs": 1})
path.write_text(yaml.safe_dump(params, sort_keys=False))
