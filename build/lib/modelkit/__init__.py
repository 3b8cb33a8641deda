"""What prior/ and vqvae/ both use, so that neither imports the other: configs stored as JSON in
checkpoints, and the range check of integer inputs."""

from modelkit.checks import check_range
from modelkit.config_json import JSONConfig
