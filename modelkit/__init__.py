"""What prior/ and vqvae/ both use, so that neither imports the other: configs stored as JSON in
checkpoints, the range check of integer inputs, and the names of a hierarchy's levels."""

from modelkit.checks import check_range
from modelkit.config_json import JSONConfig
from modelkit.levels import level_names
