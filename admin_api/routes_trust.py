"""The site keys this site trusts: list them, add one (or a rotated key's endorsement),
remove one. Changes are written into the trust folder and count at once."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Body, Path, Response

from .schemas import (
    KEY_ID_PATTERN,
    ErrorOut,
    NewEndorsedKey,
    Responses,
    TrustedKeyOut,
    TrustOut,
    TrustRequest,
)
from .services import AdminServices, KeyEndorsement, KeyToTrust, TrustedKeyInfo

KeyId = Annotated[str, Path(pattern=KEY_ID_PATTERN, examples=["0123456789abcdef"])]
_SPKI_HEAD = 12  # bytes of DER before the raw key in an Ed25519 SubjectPublicKeyInfo
_409: Responses = {
    409: {
        "model": ErrorOut,
        "description": "the site has no trust folder, or the folder holds a bad file, or "
        "the name holds another key, or the endorsement's signer is not trusted here",
    }
}
_503: Responses = {503: {"model": ErrorOut, "description": "the trust folder cannot be written"}}
_403: Responses = {
    403: {"model": ErrorOut, "description": "the endorsement's signature does not verify"}
}


def raw_public_key(text: str) -> bytes:
    """The 32 bytes of a key given as the schema allows: a site.pub, or base64."""
    if "-----" in text:
        body = text.split("-----BEGIN PUBLIC KEY-----", 1)[1].split("-----END", 1)[0]
        return base64.b64decode("".join(body.split()))[_SPKI_HEAD:]
    return base64.b64decode(text)


def trusted_key_out(k: TrustedKeyInfo) -> TrustedKeyOut:
    return TrustedKeyOut(
        key_id=k.key_id,
        public_key=base64.b64encode(k.public_key).decode("ascii"),
        own=k.own,
        file=k.file,
        endorsed_by=k.endorsed_by,
        scope=None if k.scope is None else list(k.scope),
    )


def router(services: AdminServices) -> APIRouter:
    r = APIRouter(prefix="/trust", tags=["trust"])

    @r.get("/keys", summary="The site keys trusted now, their scopes and why they count")
    async def list_keys() -> TrustOut:
        trust = services.trust()
        return TrustOut(
            folder=trust.folder,
            error=trust.error,
            keys=[trusted_key_out(k) for k in trust.keys],
        )

    @r.post(
        "/keys",
        status_code=201,
        summary="Trust a site key (with an optional scope), or a rotated key endorsed by a "
        "trusted one; written into the trust folder, counts at once",
        responses={
            200: {"model": TrustedKeyOut, "description": "trusted already; updated"},
            **_403,
            **_409,
            **_503,
        },
    )
    async def add_key(body: Annotated[TrustRequest, Body()], response: Response) -> TrustedKeyOut:
        if isinstance(body, NewEndorsedKey):
            e = body.endorsement
            key, created = await services.trust_endorsed_key(
                KeyEndorsement(e.old_key_id, e.new_key_id, e.new_public_key, e.signature)
            )
        else:
            scope = None if body.scope is None else tuple(body.scope)
            key, created = await services.trust_key(
                KeyToTrust(raw_public_key(body.public_key), scope, body.name)
            )
        if not created:
            response.status_code = 200
        return trusted_key_out(key)

    @r.delete(
        "/keys/{key_id}",
        status_code=204,
        summary="Stop trusting a key (and the keys it endorsed): its records stop counting at once",
        responses={
            404: {"model": ErrorOut, "description": "no such trusted key"},
            **_409,
            **_503,
        },
    )
    async def remove_key(key_id: KeyId) -> Response:
        await services.distrust_key(key_id)
        return Response(status_code=204)

    return r
