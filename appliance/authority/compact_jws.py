"""Former home of the compact JWS reader; it lives in appliance.jose.jws now.

Kept as names only while the authority's callers move to appliance.jose (the lead's work in
progress on authority.py); delete it once nothing imports it.
"""

from __future__ import annotations

from appliance.jose.jws import CompactJws, claim_time
from appliance.jose.jws import parse_compact as parse
from appliance.jose.jws import verify_compact as verify

__all__ = ["CompactJws", "claim_time", "parse", "verify"]
