"""The prometheus plugin's settings: ``[plugins.prometheus]`` in the config file."""

import attrs

from enigma.config import setting


@attrs.define
class PrometheusSettings:
    auth: bool = setting(False, allowed="true or false", check=lambda v: isinstance(v, bool),
                         doc="require an API key for /metrics (off: scrapers need no key)")
