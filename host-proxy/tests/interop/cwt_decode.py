"""Decodes a hostbind token with python-cwt (a third-party CWT library), as docs/protocol.md
describes it: COSE_Sign1 (tag 18), ES256, kid = SHA-256 of the token key's SEC1 encoding.

usage: cwt_decode.py TOKEN_FILE KEY_JSON
KEY_JSON: {"x": hex, "y": hex, "kid": hex} of the token key (from the token's key evidence).
Verifies the signature (and exp) and prints the claims as JSON: keys are the CWT claim numbers,
byte strings become {"hex": ...}. Exits non-zero when python-cwt refuses the token.
"""

import json
import sys

import cwt
from cwt import COSEKey


def plain(v):
    if isinstance(v, bytes):
        return {"hex": v.hex()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    return v


def main():
    token = open(sys.argv[1], "rb").read()
    k = json.load(open(sys.argv[2]))
    key = COSEKey.new(
        {
            1: 2,  # kty: EC2
            2: bytes.fromhex(k["kid"]),  # kid
            3: -7,  # alg: ES256
            -1: 1,  # crv: P-256
            -2: bytes.fromhex(k["x"]),
            -3: bytes.fromhex(k["y"]),
        }
    )
    claims = cwt.decode(token, key)
    print(json.dumps({"cwt_version": cwt.__version__, "claims": plain(claims)}))


main()
