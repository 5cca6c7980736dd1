"""Who may call what, and how much, as the ingress asks it: the tenant behind a request's key
(tenancy.KeyStore, re-read while serving), the models it may see, and its per-tenant limits
(tenancy.TenantLimiter). Without a keys file the endpoint is open: no tenant, no limits."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from lorafleet.serve import api
from lorafleet.serve.config import AppArgs
from lorafleet.serve.keys import allows


class _NoLease:
    def release(self, tokens_used: int | None = None) -> None:
        pass


class Tenants:
    def __init__(self, args: AppArgs):
        self.store = self.limiter = None
        if args.api_keys_file:
            from lorafleet.serve.tenancy import KeyStore, TenantLimiter

            self.store = KeyStore(args.api_keys_file, args.keys_reload_s)
            self.limiter = TenantLimiter()

    def check(self, request: Request) -> Any:
        """The request's tenant (None on an open endpoint), or 401. Reads headers only."""
        if self.store is None:
            return None
        tenant = self.store.tenant(request.headers.get("authorization"))
        if tenant is None:
            raise api.ApiError(
                401,
                "invalid or missing API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )
        return tenant

    @staticmethod
    def allows(tenant: Any, customer: str | None) -> bool:
        return tenant is None or allows(tenant, customer)

    @staticmethod
    def own_models(tenant: Any, base_name: str) -> list[str] | None:
        """The names a tenant may call, when they can be listed without the registry."""
        if tenant is None or "*" in tenant.adapters:
            return None
        return ([base_name] if tenant.base else []) + sorted(tenant.adapters)

    def acquire(self, tenant: Any, max_tokens: int) -> Any:
        """A lease to release with the tokens used, or 429 past the tenant's limits."""
        if self.limiter is None or tenant is None:
            return _NoLease()
        from lorafleet.serve.tenancy import TenantLimitError

        try:
            return self.limiter.acquire(tenant, max_tokens)
        except TenantLimitError as exc:
            if exc.code == "request_too_large":  # it can never fit: a retry would only wait
                raise api.ApiError(400, exc.message, code=exc.code, param="max_tokens") from None
            raise api.ApiError(
                429, exc.message, "rate_limit_error", code=exc.code, retry_after_s=exc.retry_after_s
            ) from None
