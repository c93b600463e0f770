"""A local file for a path or URL, verified against its pinned sha256 when one is given."""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from alzstage.errors import AlzstageError
from alzstage.files import atomic_path, sha256_file


def fetch(
    url_or_path: str,
    cache_dir: Path,
    sha256: str | None,
    retries: int = 3,
    *,
    base_dir: Path | None = None,
    key: str = "data.path",
    sha_key: str = "data.sha256",
    by_hand: str | None = None,
) -> Path:
    """Return a local file for a path or URL, verified against ``sha256`` when given.

    URLs are cached by content hash, so re-running with an unchanged source does not
    download again; downloads go to a temp file and are renamed only once verified.
    Relative local paths are taken from ``base_dir`` (the project root), not the current
    directory, so ``alzstage download`` means the same file wherever it is started from.
    ``key`` and ``sha_key`` are the params keys named in error messages; ``by_hand`` says
    how to use a copy downloaded by hand (default: point ``key`` at the local file).
    """
    parsed = urllib.parse.urlparse(url_or_path)
    if parsed.scheme in ("", "file") or _is_windows_drive(parsed.scheme):
        raw = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url_or_path
        local = project_path(raw, base_dir)
        if not local.exists():
            raise AlzstageError(f"{key}: {local} does not exist; set {key} to the file's location")
        if sha256:
            _verify(local, sha256, key=sha_key)
        return local
    if parsed.scheme not in ("http", "https"):
        raise AlzstageError(
            f"{key}: unsupported URL scheme {parsed.scheme!r} in {url_or_path!r} "
            "(use http, https, file or a local path)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = Path(parsed.path).name or "download"
    cached = cache_dir / f"{sha256.lower() if sha256 else 'unpinned'}-{name}"
    if sha256 and cached.exists() and sha256_file(cached) == sha256.lower():
        return cached
    last: Exception | None = None
    for attempt in range(retries):
        try:
            with atomic_path(cached) as tmp:
                _http_get(url_or_path, tmp)
                if sha256:
                    _verify(tmp, sha256, shown=url_or_path, key=sha_key)
            return cached
        except urllib.error.HTTPError as exc:
            # 4xx (a wrong URL, revision or file name) will not fix itself: do not retry.
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise AlzstageError(
                    f"{key}: {url_or_path}: HTTP {exc.code} {exc.reason}; check the URL "
                    "(repository, revision and file name)"
                ) from None
            last = exc
        except OSError as exc:  # URLError and socket timeouts are OSErrors
            last = exc
        if attempt + 1 < retries:
            time.sleep(min(2**attempt, 10) * 0.5)
    by_hand = by_hand or f"point {key} at the local file"
    raise AlzstageError(
        f"{key}: {url_or_path}: download failed after {retries} attempts ({last}); check the "
        f"URL and your network, or download it by hand and {by_hand}"
    )


def project_path(path: str, root: Path | None) -> Path:
    """``path`` with ``~`` expanded, taken from ``root`` (the project root) when relative."""
    local = Path(path).expanduser()
    return root / local if root is not None and not local.is_absolute() else local


def _is_windows_drive(scheme: str) -> bool:
    # urlparse reads "C:\\data\\x.zip" as scheme "c".
    return len(scheme) == 1 and scheme.isalpha()


def _http_get(url: str, target: Path) -> None:
    from tqdm import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "alzstage"})
    with urllib.request.urlopen(req, timeout=60) as resp, open(target, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"download {Path(url).name}",
            disable=None,
            leave=False,
        ) as bar:
            while block := resp.read(1 << 20):
                out.write(block)
                bar.update(len(block))


def _verify(path: Path, expected: str, shown: str | None = None, key: str = "data.sha256") -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise AlzstageError(
            f"{shown or path}: sha256 mismatch for {key}: expected {expected}, got {actual}; "
            "update the pinned sha256 only if you trust the new file"
        )
