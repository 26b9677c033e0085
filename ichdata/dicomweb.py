"""A DICOMweb archive as `ich pull` and `ich predict --send` reach it: QIDO-RS, WADO-RS and STOW-RS.

`connect(url)` gives an `Archive` over dicomweb-client with the credentials of `credentials(url)`
(a bearer token or a user and password from the environment, else `~/.netrc`; never the command line
or the URL, which end up in shell histories and logs), `https` verified against the system's CAs or
`--ca-bundle`. What can go wrong is sorted here once: a refused login, a URL that is not a DICOMweb
service, an untrusted certificate are `UserError`s (one line, nothing to retry); a network error or a
5xx, 408 or 429 answer is `Transient`, which `Retry.call` retries with back-off. Messages name the
URL and the HTTP status, never a response body or a credential.
"""

from __future__ import annotations

import netrc
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from ichdata.errors import UserError

if TYPE_CHECKING:
    import requests
    from dicomweb_client import DICOMwebClient
    from pydicom import Dataset

__all__ = [
    "ACCEPT_AS_STORED",
    "PASSWORD_ENV",
    "TOKEN_ENV",
    "USER_ENV",
    "Archive",
    "Retry",
    "Transient",
    "connect",
    "credentials",
    "multipart_parts",
    "part_uids",
]

#: Environment variables of the credentials, read when a command connects (never at import).
TOKEN_ENV = "ICH_DICOMWEB_TOKEN"
USER_ENV = "ICH_DICOMWEB_USER"
PASSWORD_ENV = "ICH_DICOMWEB_PASSWORD"
#: WADO-RS `Accept`: each instance in the transfer syntax the archive stored it in (`ich convert`
#: decodes the compressed ones), so nothing is transcoded on the way.
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_HINT = (
    f"set {TOKEN_ENV} (a bearer token), or {USER_ENV} and {PASSWORD_ENV}, or a ~/.netrc entry for the host"
)
_RETRIED_STATUS = {408, 429}  # with every 5xx

_T = TypeVar("_T")


class Transient(Exception):
    """A failure a later try may not meet: a network error, or an HTTP 5xx, 408 or 429 answer."""


def _bearer(token: str) -> Callable[[requests.PreparedRequest], requests.PreparedRequest]:
    def auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {token}"
        return request

    return auth


def credentials(url: str) -> tuple[Any, str]:
    """The `requests` auth for `url` and where it came from (for messages; never the secret itself).

    `ICH_DICOMWEB_TOKEN` (bearer), else `ICH_DICOMWEB_USER` + `ICH_DICOMWEB_PASSWORD` (basic), else the
    `~/.netrc` (or `$NETRC`) entry for the URL's host, else none.
    """
    token = os.environ.get(TOKEN_ENV)
    if token:
        return _bearer(token), f"the token in {TOKEN_ENV}"
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user or password:
        if not (user and password):
            raise UserError(f"{USER_ENV} and {PASSWORD_ENV} go together: set both, or neither")
        return (user, password), f"the user in {USER_ENV}"
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    host = urlsplit(url).hostname or ""
    if path.is_file():
        try:
            entry = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError) as exc:
            raise UserError(f"{path}: cannot be read as a netrc file ({type(exc).__name__})") from None
        if entry is not None and entry[0] and entry[2]:
            return (entry[0], entry[2]), f"the {path} entry for {host}"
    return None, "a request without credentials"


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"URL {url!r}: expected the root of a DICOMweb service, http(s)://host[:port]/path")
    if parts.username is not None or parts.password is not None:
        raise UserError(
            f"URL of {parts.hostname}: holds credentials, which would end up in logs and shell history; {_HINT}"
        )
    if parts.query or parts.fragment:
        raise UserError(f"URL {url}: expected the service root, without a query (filters are options)")
    return url.rstrip("/")


@dataclass(frozen=True)
class Retry:
    """How often an archive request is tried, and the waits between tries (doubling, capped)."""

    attempts: int = 4
    first_wait_s: float = 0.5
    max_wait_s: float = 8.0

    def waits(self) -> Iterator[float]:
        """The wait before each try after the first."""
        wait = self.first_wait_s
        for _ in range(self.attempts - 1):
            yield wait
            wait = min(self.max_wait_s, 2 * wait)

    def call(
        self,
        fn: Callable[[], _T],
        sleep: Callable[[float], None] = time.sleep,
        progressed: Callable[[], bool] | None = None,
    ) -> _T:
        """`fn()`, tried again after each `Transient` until `attempts` are spent (then it is raised).

        `progressed()`, asked after a failure, says whether that try got further than the one before
        (wrote instances a retry will not fetch again): then the count of tries and the waits start over,
        so a long series on a flaky link is finished rather than given up.
        """
        waits = self.waits()
        while True:
            try:
                return fn()
            except Transient:
                if progressed is not None and progressed():
                    waits = self.waits()
                wait = next(waits, None)
                if wait is None:
                    raise
                sleep(wait)


def _translate(exc: Exception, url: str, auth_from: str) -> Exception:
    """`exc` from requests or a response check as `UserError` (nothing to retry) or `Transient`."""
    import requests

    if isinstance(exc, requests.exceptions.SSLError):
        return UserError(
            f"{url}: the server's certificate is not trusted ({_short(exc)}); pass --ca-bundle with the "
            "CA certificate your site uses"
        )
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        reason = f"HTTP {status} {exc.response.reason or ''}".strip()
        if status in (401, 403):
            return UserError(f"{url}: the archive refused {auth_from} ({reason}); {_HINT}")
        if status >= 500 or status in _RETRIED_STATUS:
            return Transient(reason)
        return UserError(
            f"{url}: does not answer as a DICOMweb service ({reason} for {_path_of(exc.response.url)}); "
            "expected the service root, e.g. http://host:8042/dicom-web"
        )
    if isinstance(exc, requests.exceptions.RequestException):
        return Transient(_short(exc))
    return exc


def _short(exc: BaseException) -> str:
    """A short reason for a network error: its type and the innermost cause, never a URL's query."""
    inner: BaseException = exc
    seen = set()
    while inner.__context__ is not None and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.__context__
    text = str(inner.args[0]) if inner.args and isinstance(inner.args[0], str) else type(inner).__name__
    for marker in ("Connection refused", "Name or service not known", "timed out", "reset by peer"):
        if marker in str(exc) or marker in text:
            return marker.lower()
    return text[:120]


def _path_of(url: str) -> str:
    return urlsplit(url).path or "/"


def _uids(results: Sequence[Mapping[str, Any]], tag: str, url: str) -> list[str]:
    """The values of `tag` (e.g. `0020000D`) in QIDO-RS JSON results; UserError when it is not such JSON."""
    out = []
    for r in results:
        try:
            value = r[tag]["Value"][0]
        except (KeyError, IndexError, TypeError):
            raise UserError(
                f"{url}: does not answer as a DICOMweb service (a QIDO-RS result without ({tag[:4]},{tag[4:]}))"
            ) from None
        out.append(str(value))
    return out


class Archive:
    """One DICOMweb service: the QIDO-RS searches, WADO-RS retrievals and STOW-RS stores `ich` makes.

    Each thread gets a client (an HTTP session) of its own. Every method raises `UserError` or
    `Transient` (see the module docstring), not requests' exceptions.
    """

    def __init__(
        self, url: str, *, ca_bundle: str | os.PathLike[str] | None = None, timeout_s: float = 60
    ) -> None:
        self.url = _check_url(url)
        self._auth, self.auth_from = credentials(self.url)
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            raise UserError(f"--ca-bundle {ca_bundle}: no such file; expected a PEM file of CA certificates")
        self._verify: bool | str = str(ca_bundle) if ca_bundle is not None else True
        self._timeout = timeout_s
        self._local = threading.local()

    @property
    def client(self) -> DICOMwebClient:
        """This thread's dicomweb-client, on this thread's session (auth, CA bundle), its retries off.

        Retries are `Retry`'s, at the level of a study, where a connection dropped mid-series is met too.
        """
        client = getattr(self._local, "client", None)
        if client is None:
            from dicomweb_client import DICOMwebClient

            client = DICOMwebClient(self.url, session=self.session, timeout=self._timeout)
            client.set_http_retry_params(retry=False)
            self._local.client = client
        return client

    @property
    def session(self) -> requests.Session:
        """This thread's HTTP session: our credentials and CA bundle (requests' own netrc lookup is moot)."""
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            session.auth = self._auth
            session.verify = self._verify
            self._local.session = session
        return session

    def _call(self, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except UserError:
            raise
        except ValueError as exc:
            # dicomweb-client's own checks of what came back (not JSON, a malformed multipart message)
            raise UserError(f"{self.url}: does not answer as a DICOMweb service ({_short(exc)})") from None
        except Exception as exc:
            translated = _translate(exc, self.url, self.auth_from)
            if translated is exc:
                raise
            raise translated from None

    def find_studies(self, filters: Mapping[str, str], page_size: int = 100) -> list[str]:
        """The Study Instance UIDs QIDO-RS lists for `filters`, every page (until an empty one)."""
        found: list[str] = []
        offset = 0
        while True:
            page = self._call(
                partial(
                    self.client.search_for_studies,
                    search_filters=dict(filters),
                    fields=["StudyInstanceUID"],
                    limit=page_size,
                    offset=offset,
                )
            )
            if not isinstance(page, list):
                raise UserError(f"{self.url}: does not answer as a DICOMweb service (QIDO-RS gave no list)")
            if not page:
                return list(dict.fromkeys(found))
            found += _uids(page, "0020000D", self.url)
            offset += len(page)

    def find_series(self, study_uid: str, modality: str | None) -> list[str]:
        """The Series Instance UIDs of `study_uid` (of `modality`, if given), every page."""
        filters = {"Modality": modality} if modality else None
        results = self._call(
            lambda: self.client.search_for_series(
                study_instance_uid=study_uid, search_filters=filters, get_remaining=True
            )
        )
        return _uids(results, "0020000E", self.url)

    def find_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """The SOP Instance UIDs of one series, every page."""
        results = self._call(
            lambda: self.client.search_for_instances(
                study_instance_uid=study_uid, series_instance_uid=series_uid, get_remaining=True
            )
        )
        return _uids(results, "00080018", self.url)

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str | None = None) -> Iterator[bytes]:
        """The Part 10 bytes of a series' instances (or of one instance) as the archive stored them.

        A WADO-RS GET on this thread's session, read as a stream: dicomweb-client's retrieve methods
        parse each part into a pydicom Dataset (which we would encode again), and its multipart decoder
        hands on the bytes after the last boundary when a connection closes early. `multipart_parts`
        yields only parts whose closing boundary arrived, and raises `Transient` when the message ends
        before its last one: a half-sent instance is never written.
        """
        url = f"{self.url}/studies/{study_uid}/series/{series_uid}"
        if sop_uid is not None:
            url += f"/instances/{sop_uid}"

        def get() -> requests.Response:
            response = self.session.get(
                url, headers={"Accept": ACCEPT_AS_STORED}, stream=True, timeout=self._timeout
            )
            response.raise_for_status()
            return response

        response = self._call(get)
        with response:
            boundary = _boundary(response.headers.get("Content-Type", ""))
            if boundary is None:  # one instance, not encapsulated: tolerated, as dicomweb-client does
                yield self._call(lambda: response.content)
                return
            # Small enough that a connection dropped late in a series leaves the instances before it.
            chunks = response.iter_content(chunk_size=1 << 16)

            def read() -> Iterator[bytes]:
                while (chunk := self._call(lambda: next(chunks, None))) is not None:
                    yield chunk

            yield from multipart_parts(read(), boundary)

    def store(self, datasets: Sequence[Dataset]) -> None:
        """STOW-RS `datasets` (all of one study); `Transient` or `UserError` when the archive refuses any."""
        response = self._call(lambda: self.client.store_instances(datasets=list(datasets)))
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            raise UserError(f"{self.url}: the archive refused {len(failed)} of {len(datasets)} SR instances")


def connect(url: str, *, ca_bundle: str | os.PathLike[str] | None = None) -> Archive:
    """An `Archive` for the DICOMweb service at `url` (checked; nothing is sent yet)."""
    return Archive(url, ca_bundle=ca_bundle)


def _boundary(content_type: str) -> bytes | None:
    """The boundary of a `multipart/related` Content-Type, or None for any other type."""
    media, *params = (p.strip() for p in content_type.split(";"))
    if media.lower() != "multipart/related":
        return None
    for p in params:
        key, _, value = p.partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("ascii", "replace")
    raise Transient("a multipart answer without a boundary")


def multipart_parts(chunks: Iterable[bytes], boundary: bytes) -> Iterator[bytes]:
    """The bodies of a multipart message's parts (RFC 2046), each yielded once its closing boundary came.

    Raises `Transient` when the message ends before its close delimiter (a connection dropped mid-way),
    so the part in flight is dropped rather than handed on cut short.
    """
    delimiter = b"\r\n--" + boundary
    data = bytearray(b"\r\n")  # the first boundary has no CRLF before it
    opened = False
    search = 0
    for chunk in chunks:
        data += chunk
        while True:
            i = data.find(delimiter, search)
            end = i + len(delimiter)
            if i < 0 or len(data) < end + 2:  # no boundary yet, or not what follows it
                search = i if i >= 0 else max(0, len(data) - len(delimiter) + 1)
                break
            closing = data[end : end + 2] == b"--"
            line_end = data.find(b"\r\n", end)
            if not closing:
                if line_end < 0:
                    search = i
                    break
                if data[end:line_end].strip(b" \t"):  # "--boundary" must end its line: this is content
                    search = i + 1
                    continue
            if opened:
                yield _part_body(bytes(data[:i]))
            if closing:
                return
            del data[: line_end + 2]
            opened, search = True, 0
    raise Transient("the answer ended before its last part")


def _part_body(part: bytes) -> bytes:
    """The body of one multipart part: what follows its header fields and the blank line."""
    if part.startswith(b"\r\n"):  # no header fields
        return part[2:]
    _, sep, body = part.partition(b"\r\n\r\n")
    if not sep:
        raise Transient("a multipart part without the blank line after its headers")
    return body


def part_uids(part: bytes) -> tuple[str, str, str]:
    """(Study, Series, SOP Instance UID) of one retrieved instance, from its header only."""
    from pydicom import dcmread

    ds = dcmread(
        BytesIO(part),
        stop_before_pixels=True,
        specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
    )
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
