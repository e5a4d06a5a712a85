"""A Python client of the mono_quant service, on httpx.

Example:
    >>> from app.client import MonoQuantClient
    >>> with MonoQuantClient("http://127.0.0.1:8000", api_key="...") as client:   # doctest: +SKIP
    ...     job = client.submit("model.safetensors", bits=8, dynamic=True)
    ...     job = client.wait(job["id"], progress=True)
    ...     path = client.download(job["id"], "model.safetensors", "model-int8.safetensors")

Every error answer becomes an :class:`ApiError` subclass carrying the server's ``detail``,
``suggestion`` and ``errors``; a job that ends failed or cancelled raises
:class:`JobFailedError` from :meth:`MonoQuantClient.wait`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from mono_quant.core.options import QuantizeOptions, option_specs

__all__ = [
    "MonoQuantClient",
    "ApiError",
    "BadRequestError",
    "AuthenticationError",
    "NotFoundError",
    "ConflictError",
    "PayloadTooLargeError",
    "UnsupportedFormatError",
    "UnprocessableError",
    "ServerError",
    "JobFailedError",
    "IntegrityError",
]

PathLike = str | os.PathLike
_TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """An error answer of the service (problem+json), or a failure to reach it (status 0)."""

    def __init__(self, status: int, detail: str, suggestion: str | None = None, problem: Mapping | None = None):
        self.status = status
        self.detail = detail
        self.suggestion = suggestion
        self.problem = dict(problem or {})
        self.errors: list[dict] = list(self.problem.get("errors") or [])
        self.request_id: str | None = self.problem.get("request_id")
        super().__init__(f"{status}: {detail}" + (f"\nSuggestion: {suggestion}" if suggestion else ""))


class BadRequestError(ApiError):
    """400: the input cannot be used (corrupt file, missing calibration data...)."""


class AuthenticationError(ApiError):
    """401: missing or unknown API key."""


class NotFoundError(ApiError):
    """404: no such resource for this API key."""


class ConflictError(ApiError):
    """409: not possible in the resource's current state (artifacts before success...)."""


class PayloadTooLargeError(ApiError):
    """413: the upload is over the server's limit."""


class UnsupportedFormatError(ApiError):
    """415: the file format is refused (pickled module, TorchScript, .pt2) or unknown."""


class UnprocessableError(ApiError):
    """422: invalid parameters; ``errors`` lists the fields."""


class ServerError(ApiError):
    """5xx, or the server could not be reached."""


class JobFailedError(ApiError):
    """The job ended failed or cancelled; ``job`` is its last state."""

    def __init__(self, job: Mapping[str, Any]):
        error = job.get("error") or {}
        self.job = dict(job)
        super().__init__(
            0,
            f"job {job.get('id')} {job.get('status')}: {error.get('type', '')}: {error.get('message', '')}".strip(),
            error.get("suggestion"),
        )


class IntegrityError(ApiError):
    """A download's sha256 does not match the artifact's."""


_ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedFormatError,
    422: UnprocessableError,
}


def _raise_for_problem(response: httpx.Response) -> None:
    if response.is_success or response.status_code in (304,):
        return
    try:
        problem = response.json()
    except ValueError:
        problem = {"detail": response.text[:500]}
    if not isinstance(problem, dict):
        problem = {"detail": str(problem)[:500]}
    cls = _ERRORS_BY_STATUS.get(response.status_code, ServerError if response.status_code >= 500 else ApiError)
    raise cls(
        response.status_code, str(problem.get("detail", response.reason_phrase)), problem.get("suggestion"), problem
    )


def _form_value(value: Any) -> str | list[str]:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):  # layer_overrides={pattern: precision}
        return [f"{key}={item}" for key, item in value.items()]
    if isinstance(value, (list, tuple)):
        # (pattern, precision) pairs of layer_overrides become "pattern=precision" fields
        return ["=".join(map(str, item)) if isinstance(item, tuple) else str(item) for item in value]
    return str(value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class MonoQuantClient:
    """Talks to one mono_quant service.

    ``http`` lets you pass your own ``httpx.Client`` (a test client, custom transport or
    proxies); it must have the service as its base URL. Otherwise one is created for
    ``base_url``.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        http: httpx.Client | None = None,
    ) -> None:
        self._owns_http = http is None
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout)
        self.api_key = api_key

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> MonoQuantClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------
    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        headers.update(extra or {})
        return headers

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request with the API key; raises an :class:`ApiError` on an error answer."""
        headers = self._headers(kwargs.pop("headers", None))
        try:
            response = self.http.request(method, path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise ServerError(0, f"cannot reach the service: {exc}", "Check the server URL and that it runs.") from exc
        _raise_for_problem(response)
        return response

    def _post_files(
        self, path: str, files: Mapping[str, PathLike | None], data: Mapping[str, Any], idempotency_key: str | None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with ExitStack() as stack:
            parts: dict[str, tuple[str, BinaryIO]] = {}
            for field, file in files.items():
                if file is not None:
                    handle = stack.enter_context(open(file, "rb"))
                    parts[field] = (Path(file).name, handle)
            form = {key: _form_value(value) for key, value in data.items() if value is not None}
            return self.request("POST", path, files=parts or None, data=form, headers=headers).json()

    # -- uploads ----------------------------------------------------------------------------------
    def upload_model(self, path: PathLike, idempotency_key: str | None = None) -> dict[str, Any]:
        """Upload a model once, to quantize it several times by ``model_id``."""
        return self._post_files("/v1/models", {"file": path}, {}, idempotency_key)

    def upload_dataset(self, path: PathLike, idempotency_key: str | None = None) -> dict[str, Any]:
        """Upload calibration data once, to use it by ``dataset_id``."""
        return self._post_files("/v1/datasets", {"file": path}, {}, idempotency_key)

    # -- jobs -------------------------------------------------------------------------------------
    def submit(
        self,
        model: PathLike | None = None,
        *,
        model_id: str | None = None,
        calibration: PathLike | None = None,
        dataset_id: str | None = None,
        eval: PathLike | None = None,
        eval_id: str | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """Queue a job: a model file or ``model_id``, optional calibration file or
        ``dataset_id``, optional eval text file or ``eval_id`` (the report's accuracy and what
        ``max_accuracy_loss`` is measured on), and parameters as for ``mono_quant.quantize``
        (bits, dynamic, scheme, group_size, layer_overrides, max_accuracy_loss, validate,
        callback_url...). Returns the job.

        The library options among ``params`` are checked with the library's own rules
        (:class:`~mono_quant.core.options.QuantizeOptions`) before anything is uploaded, so a
        bad value raises ConfigurationError here instead of costing an upload and a 422."""
        library = {k: v for k, v in params.items() if k in option_specs(http=True)}
        has_calibration = calibration is not None or dataset_id is not None
        options = QuantizeOptions.for_request(has_calibration, **library)
        options.check_data(has_calibration, has_eval=eval is not None or eval_id is not None)
        data = dict(params)
        data.update({"model_id": model_id, "dataset_id": dataset_id, "eval_id": eval_id})
        files = {"model": model, "calibration": calibration, "eval": eval}
        return self._post_files("/v1/quantize", files, data, idempotency_key)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def list_jobs(self, status: str | list[str] | None = None, limit: int = 20, after: str | None = None) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = [status] if isinstance(status, str) else list(status)
        if after:
            params["after"] = after
        return self.request("GET", "/v1/jobs", params=params).json()

    def iter_jobs(self, status: str | list[str] | None = None, page_size: int = 50) -> Iterator[dict[str, Any]]:
        """Every job, newest first, following the cursor."""
        after = None
        while True:
            page = self.list_jobs(status=status, limit=page_size, after=after)
            yield from page["items"]
            after = page.get("next_after")
            if not after:
                return

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def delete(self, job_id: str) -> None:
        self.request("DELETE", f"/v1/jobs/{job_id}")

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/jobs/{job_id}/events").json()

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        progress: bool = False,
        raise_on_failure: bool = True,
    ) -> dict[str, Any]:
        """Poll until the job ends; with ``progress=True`` draw a tqdm bar per stage.
        Raises JobFailedError when it failed or was cancelled (unless ``raise_on_failure``
        is False), TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        stage = None
        try:
            while True:
                job = self.get_job(job_id)
                if progress:
                    bar, stage = self._draw(bar, stage, job)
                if job["status"] in _TERMINAL:
                    if raise_on_failure and job["status"] != "succeeded":
                        raise JobFailedError(job)
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
                time.sleep(poll_interval)
        finally:
            if bar is not None:
                bar.close()

    @staticmethod
    def _draw(bar: Any, stage: str | None, job: Mapping[str, Any]) -> tuple[Any, str | None]:
        from tqdm.auto import tqdm

        current = job["progress"].get("stage") or job["status"]
        if current != stage:
            if bar is not None:
                bar.close()
            bar = tqdm(total=100, desc=current, unit="%", leave=False)
            stage = current
        bar.n = round(100 * float(job["progress"].get("fraction") or 0.0))
        bar.refresh()
        return bar, stage

    # -- artifacts --------------------------------------------------------------------------------
    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/jobs/{job_id}/artifacts").json()

    def download(self, job_id: str, name: str = "model.safetensors", dest: PathLike | None = None) -> Path:
        """Download an artifact to ``dest`` (default: ``./<name>``), resuming a partial
        ``dest.part`` with a Range request, and check its sha256. Returns the path."""
        listing = {artifact["name"]: artifact for artifact in self.artifacts(job_id)}
        if name not in listing:
            raise NotFoundError(404, f"job {job_id} has no artifact {name!r}", f"Available: {sorted(listing)}.")
        expected = listing[name]["sha256"]
        target = Path(dest) if dest is not None else Path(name)
        partial = target.with_name(target.name + ".part")
        offset = partial.stat().st_size if partial.exists() else 0
        headers = self._headers({"Range": f"bytes={offset}-", "If-Range": f'"{expected}"'} if offset else None)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}", headers=headers) as response:
            if response.status_code == 416:  # the partial file is already complete
                response.read()
            else:
                if not response.is_success:
                    response.read()
                    _raise_for_problem(response)
                mode = "ab" if response.status_code == 206 else "wb"
                with open(partial, mode) as handle:
                    for chunk in response.iter_bytes(1024 * 1024):
                        handle.write(chunk)
        actual = _sha256(partial)
        if actual != expected:
            partial.unlink(missing_ok=True)
            raise IntegrityError(0, f"downloaded {name} has sha256 {actual}, expected {expected}", "Download it again.")
        os.replace(partial, target)
        return target

    def quantize(self, model: PathLike, dest: PathLike, timeout: float | None = None, **params: Any) -> Path:
        """Submit, wait and download ``model.safetensors`` to ``dest`` in one call."""
        job = self.submit(model, **params)
        self.wait(job["id"], timeout=timeout)
        return self.download(job["id"], "model.safetensors", dest)
