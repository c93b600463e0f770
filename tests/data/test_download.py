"""Tests for the download stage: every source ends as the same raw layout, or refuses.

Archives, parquet files and servers are built in ``tmp_path``; nothing reaches the
internet (the HTTP tests talk to a server on 127.0.0.1, Kaggle is a stand-in module).
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import tarfile
import types
import zipfile
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CLASSES, LocalServer, write_jpeg
from PIL import Image

from alzstage.artifacts import read_raw_manifest
from alzstage.config import BaseParams, DataParams, Params, Paths
from alzstage.data.download import SOURCES, run_download
from alzstage.data.manifest import MANIFEST_COLUMNS
from alzstage.data.sources.huggingface import label_table
from alzstage.data.sources.kaggle import kaggle_credentials
from alzstage.errors import AlzstageError, ConfigError
from alzstage.files import sha256_file

# --------------------------------------------------------------------------- helpers


def make_zip(src: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f.relative_to(src).as_posix())
    return target


def make_tar(src: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as tf:
        tf.add(src, arcname=".")
    return target


def params_for(**data: object) -> Params:
    return Params(data=DataParams(**data))


def raw_files(paths: Paths) -> list[str]:
    return sorted(p.relative_to(paths.raw).as_posix() for p in paths.raw.rglob("*") if p.is_file())


def leftovers(paths: Paths) -> list[str]:
    """Anything but data/raw in data/: temp dirs or unpack folders a failure left behind."""
    data = paths.raw.parent
    return sorted(p.name for p in data.iterdir() if p.name != "raw") if data.exists() else []


def assert_kaggle_layout(paths: Paths) -> None:
    manifest = read_raw_manifest(paths.raw_manifest)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 16
    assert (manifest["path"].str.split("/").str[1] == manifest["source_split"]).all()
    assert (manifest["path"].str.split("/").str[2] == manifest["label"]).all()
    counts = manifest.groupby(["source_split", "label"]).size()
    assert counts.loc["train"].to_dict() == dict.fromkeys(CLASSES, 3)
    assert counts.loc["test"].to_dict() == dict.fromkeys(CLASSES, 1)
    assert (manifest["format"] == "JPEG").all() and (manifest["width"] == 20).all()
    for row in manifest.itertuples():
        assert sha256_file(paths.raw / row.path) == row.sha256


# --------------------------------------------------------------------------- archive / folder


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_in_kaggle_layout(tmp_path: Path, kaggle_tree: Path, kind: str) -> None:
    maker = make_zip if kind == "zip" else make_tar
    archive = maker(kaggle_tree, tmp_path / f"alz.{kind}")
    paths = Paths(tmp_path / "proj")
    result = run_download(params_for(source="archive", path=str(archive)), paths)
    assert_kaggle_layout(paths)
    assert "images/train/MildDemented/0.jpg" in raw_files(paths)
    assert result.metrics["n_images"] == 16.0
    assert result.metrics["n_NonDemented"] == 4.0
    assert leftovers(paths) == []


def test_every_data_source_value_has_one_collect_function() -> None:
    # the registry and the params schema name the same sources, so neither can lag
    allowed = get_args(DataParams.model_fields["source"].annotation)
    assert sorted(SOURCES) == sorted(allowed)
    assert all(callable(collect) for collect in SOURCES.values())


def test_an_unknown_source_is_one_line_naming_the_key_and_the_choices(tmp_path: Path) -> None:
    # params.yaml refuses it first; a Params built without validation meets the registry
    params = params_for()
    params = params.model_copy(update={"data": params.data.model_copy(update={"source": "s3"})})
    paths = Paths(tmp_path / "proj")
    with pytest.raises(ConfigError) as err:
        run_download(params, paths)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.source: must be one of")
    assert all(repr(name) in message for name in SOURCES) and "'s3'" in message
    assert not paths.raw.exists()


def test_folder_source_without_splits(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_jpeg(src / "Mild_Demented" / "a.jpg", 1)  # alias spelling, mapped by name
    write_jpeg(src / "non demented" / "b.jpg", 2)
    paths = Paths(tmp_path / "proj")
    run_download(params_for(source="folder", path=str(src)), paths)
    manifest = read_raw_manifest(paths.raw_manifest)
    assert manifest["path"].tolist() == ["images/MildDemented/a.jpg", "images/NonDemented/b.jpg"]
    assert manifest["source_split"].tolist() == ["", ""]
    assert (src / "Mild_Demented" / "a.jpg").exists()  # a folder source is copied, not moved


def test_relative_path_is_taken_from_project_root(tmp_path: Path, kaggle_tree: Path) -> None:
    proj = tmp_path / "proj"
    (proj / "inbox").mkdir(parents=True)
    make_zip(kaggle_tree, proj / "inbox" / "a.zip")
    run_download(params_for(source="archive", path="inbox/a.zip"), Paths(proj))
    assert_kaggle_layout(Paths(proj))


def test_unknown_class_folder_is_an_error(tmp_path: Path, kaggle_tree: Path) -> None:
    write_jpeg(kaggle_tree / "Alzheimer_s Dataset" / "train" / "Demented" / "x.jpg", 99)
    paths = Paths(tmp_path / "proj")
    with pytest.raises(AlzstageError, match=r"Demented.*1 images.*class_aliases"):
        run_download(params_for(source="folder", path=str(kaggle_tree)), paths)
    assert not paths.raw.exists()


def test_sha256_mismatch(tmp_path: Path, kaggle_tree: Path) -> None:
    archive = make_zip(kaggle_tree, tmp_path / "a.zip")
    with pytest.raises(AlzstageError, match=r"sha256 mismatch for data\.sha256"):
        run_download(
            params_for(source="archive", path=str(archive), sha256="0" * 64),
            Paths(tmp_path / "proj"),
        )
    ok = params_for(source="archive", path=str(archive), sha256=sha256_file(archive).upper())
    run_download(ok, Paths(tmp_path / "proj"))


def test_missing_archive_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(AlzstageError, match=r"data\.path: .*nope\.zip does not exist"):
        run_download(
            params_for(source="archive", path=str(tmp_path / "nope.zip")), Paths(tmp_path / "proj")
        )


def test_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not an archive at all")
    with pytest.raises(AlzstageError, match="neither a zip nor a tar"):
        run_download(params_for(source="archive", path=str(junk)), Paths(tmp_path / "proj"))


# --------------------------------------------------------------------------- damaged archives


def forge_sizes(archive: Path) -> Path:
    """Halve every declared uncompressed size, in the local headers and the central directory."""
    import struct

    data = bytearray(archive.read_bytes())
    for magic, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(magic)
        while at >= 0:
            size = struct.unpack_from("<I", data, at + offset)[0]
            struct.pack_into("<I", data, at + offset, size // 2)
            at = data.find(magic, at + 4)
    archive.write_bytes(bytes(data))
    return archive


def cut_in_half(archive: Path) -> Path:
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    return archive


DAMAGED = {
    "zip with forged sizes": (
        lambda src, t: forge_sizes(make_zip(src, t / "a.zip")),
        r"a\.zip: the archive is corrupt or truncated \(Bad CRC-32 .*download it again",
    ),
    "truncated zip": (
        lambda src, t: cut_in_half(make_zip(src, t / "a.zip")),
        r"a\.zip: starts like a zip archive .* truncated or corrupt; download it again",
    ),
    "truncated tar.gz": (
        lambda src, t: cut_in_half(make_tar(src, t / "a.tar.gz")),
        r"a\.tar\.gz: .*(corrupt or truncated|truncated or corrupt).*download it again",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_archive_is_named_as_corrupt(tmp_path: Path, kaggle_tree: Path, case: str) -> None:
    # given an archive damaged in transit or on purpose
    make, message = DAMAGED[case]
    archive = make(kaggle_tree, tmp_path)
    paths = Paths(tmp_path / "proj")
    # when it is downloaded, then the error names the file and says to fetch it again
    with pytest.raises(AlzstageError, match=message):
        run_download(params_for(source="archive", path=str(archive)), paths)
    assert not paths.raw.exists()
    assert leftovers(paths) == []


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_with_repeated_entry_names_is_refused(tmp_path: Path, kind: str) -> None:
    name = "Alzheimer_s Dataset/train/NonDemented/0.jpg"
    jpeg = (tmp_path / "x.jpg", tmp_path / "y.jpg")
    write_jpeg(jpeg[0], 1), write_jpeg(jpeg[1], 2)
    archive = tmp_path / f"dup.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf, pytest.warns(UserWarning, match="Duplicate"):
            zf.write(jpeg[0], name)
            zf.write(jpeg[1], name)
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(jpeg[0], arcname=name)
            tf.add(jpeg[1], arcname="./" + name)  # the same file, spelt differently
    paths = Paths(tmp_path / "proj")
    with pytest.raises(AlzstageError, match=rf"'{name}' \(2 times\).*overwrite"):
        run_download(params_for(source="archive", path=str(archive)), paths)
    assert not paths.raw.exists()


def test_every_file_is_kept_or_listed_with_a_reason(tmp_path: Path, kaggle_tree: Path) -> None:
    # given class folders that also hold other formats, an extensionless JPEG and clutter
    folder = kaggle_tree / "Alzheimer_s Dataset" / "train" / "MildDemented"
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8)
    for fmt, suffix in (("BMP", ".bmp"), ("TIFF", ".tif"), ("GIF", ".gif"), ("WEBP", ".webp")):
        Image.fromarray(pixels).save(folder / f"scan{suffix}", format=fmt)
    Image.fromarray(pixels).save(folder / "noext_png", format="PNG")
    Image.fromarray(pixels).save(folder / "noext_bmp", format="BMP")
    (folder / "notes.txt").write_text("scanner settings\n")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (kaggle_tree / "README.md").write_text("# the dataset\n")
    archive = make_zip(kaggle_tree, tmp_path / "a.zip")
    n_files = len(zipfile.ZipFile(archive).namelist()) - sum(
        n.endswith("/") for n in zipfile.ZipFile(archive).namelist()
    )
    paths = Paths(tmp_path / "proj")

    # when
    result = run_download(params_for(source="archive", path=str(archive)), paths)

    # then every file is either in the manifest or in skipped.csv, with its reason
    manifest = read_raw_manifest(paths.raw_manifest)
    skipped = pd.read_csv(paths.raw / "skipped.csv", keep_default_na=False)
    assert len(manifest) + len(skipped) == n_files
    assert "images/train/MildDemented/noext_png.png" in set(manifest["path"])
    reasons = dict(
        zip(skipped["path"].str.rsplit("/", n=1).str[-1], skipped["reason"], strict=True)
    )
    assert reasons == {
        "scan.bmp": "unsupported_format",
        "scan.tif": "unsupported_format",
        "scan.gif": "unsupported_format",
        "scan.webp": "unsupported_format",
        "noext_bmp": "unsupported_format",
        "notes.txt": "unsupported_format",
        ".DS_Store": "hidden",
        "README.md": "not_in_class_folder",
    }
    details = dict(
        zip(skipped["path"].str.rsplit("/", n=1).str[-1], skipped["detail"], strict=True)
    )
    assert details["scan.webp"] == "WEBP image" and details["noext_bmp"] == "BMP image"
    assert set(skipped.loc[skipped["reason"] == "unsupported_format", "label"]) == {"MildDemented"}
    # and the summary says so, naming them
    assert "skipped 8 file(s)" in result.summary and "scan.bmp (BMP image)" in result.summary
    assert result.metrics["n_skipped"] == 8


def test_a_source_with_nothing_to_skip_writes_an_empty_skip_list(
    tmp_path: Path, kaggle_tree: Path
) -> None:
    paths = Paths(tmp_path / "proj")
    result = run_download(params_for(source="folder", path=str(kaggle_tree)), paths)
    assert (paths.raw / "skipped.csv").read_text().strip() == "path,label,reason,detail"
    assert "skipped" not in result.summary


# --------------------------------------------------------------------------- unsafe archives


def zip_with(tmp_path: Path, name: str, data: bytes = b"x", mode: int | None = None) -> Path:
    target = tmp_path / "evil.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("Alzheimer_s Dataset/train/NonDemented/ok.jpg", b"fine")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.create_system = 3  # unix, so the mode bits are honoured
            info.external_attr = mode << 16
        zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return target


def tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    target = tmp_path / "evil.tar.gz"
    with tarfile.open(target, "w:gz") as tf:
        ok = tarfile.TarInfo("Alzheimer_s Dataset/train/NonDemented/ok.jpg")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"fine"))
        tf.addfile(member, io.BytesIO(data) if data else None)
    return target


def _tar_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = linkname
    return m


UNSAFE = {
    "zip traversal": (lambda t: zip_with(t, "../escape.jpg"), r"'\.\./escape\.jpg'.*traversal"),
    "zip nested traversal": (
        lambda t: zip_with(t, "a/../../escape.jpg"),
        r"'a/\.\./\.\./escape\.jpg'.*traversal",
    ),
    "zip absolute": (lambda t: zip_with(t, "/etc/evil.jpg"), r"'/etc/evil\.jpg'.*absolute"),
    "zip windows drive": (lambda t: zip_with(t, "C:/evil.jpg"), r"'C:/evil\.jpg'.*absolute"),
    "zip symlink": (
        lambda t: zip_with(t, "link.jpg", b"/etc/passwd", stat.S_IFLNK | 0o777),
        r"'link\.jpg' is a symlink",
    ),
    "zip device": (
        lambda t: zip_with(t, "dev", b"", stat.S_IFCHR | 0o666),
        r"'dev' is a device or special file",
    ),
    "tar traversal": (
        lambda t: tar_with(t, _tar_member("../escape.jpg", tarfile.REGTYPE)),
        r"'\.\./escape\.jpg'.*traversal",
    ),
    "tar absolute": (
        lambda t: tar_with(t, _tar_member("/tmp/evil.jpg", tarfile.REGTYPE)),
        r"'/tmp/evil\.jpg'.*absolute",
    ),
    "tar symlink": (
        lambda t: tar_with(t, _tar_member("link.jpg", tarfile.SYMTYPE, "/etc/passwd")),
        r"'link\.jpg' is a link",
    ),
    "tar hardlink": (
        lambda t: tar_with(t, _tar_member("hard.jpg", tarfile.LNKTYPE, "/etc/passwd")),
        r"'hard\.jpg' is a link",
    ),
    "tar char device": (
        lambda t: tar_with(t, _tar_member("dev/tty", tarfile.CHRTYPE)),
        r"'dev/tty' is a device or special file",
    ),
    "tar fifo": (
        lambda t: tar_with(t, _tar_member("fifo", tarfile.FIFOTYPE)),
        r"'fifo' is a device or special file",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archives_are_refused(tmp_path: Path, case: str) -> None:
    make, message = UNSAFE[case]
    archive = make(tmp_path)
    paths = Paths(tmp_path / "proj")
    with pytest.raises(AlzstageError, match=message):
        run_download(params_for(source="archive", path=str(archive)), paths)
    assert not paths.raw.exists()
    assert leftovers(paths) == []
    assert not (tmp_path / "escape.jpg").exists()


def test_zip_bomb_ratio_is_refused(tmp_path: Path) -> None:
    bomb = zip_with(tmp_path, "Alzheimer_s Dataset/train/NonDemented/bomb.jpg", bytes(4 << 20))
    paths = Paths(tmp_path / "proj")
    with pytest.raises(AlzstageError, match=r"'.*bomb\.jpg' has compression ratio \d+ > 200"):
        run_download(params_for(source="archive", path=str(bomb)), paths)
    assert not paths.raw.exists()


def test_tar_bomb_overall_ratio_is_refused(tmp_path: Path) -> None:
    member = _tar_member("Alzheimer_s Dataset/train/NonDemented/bomb.jpg", tarfile.REGTYPE)
    member.size = 4 << 20
    bomb = tar_with(tmp_path, member, bytes(4 << 20))
    with pytest.raises(AlzstageError, match=r"overall compression ratio \d+ > 200"):
        run_download(params_for(source="archive", path=str(bomb)), Paths(tmp_path / "proj"))


def test_total_size_limit(tmp_path: Path, kaggle_tree: Path) -> None:
    archive = make_zip(kaggle_tree, tmp_path / "a.zip")
    params = params_for(source="archive", path=str(archive), max_extract_bytes=1000)
    with pytest.raises(AlzstageError, match=r"over the limit of 1000.*data\.max_extract_bytes"):
        run_download(params, Paths(tmp_path / "proj"))


def test_failure_keeps_previous_good_raw(tmp_path: Path, kaggle_tree: Path) -> None:
    paths = Paths(tmp_path / "proj")
    run_download(
        params_for(source="archive", path=str(make_zip(kaggle_tree, tmp_path / "a.zip"))), paths
    )
    before = {f: sha256_file(paths.raw / f) for f in raw_files(paths)}
    bad = zip_with(tmp_path, "../escape.jpg")
    with pytest.raises(AlzstageError):
        run_download(params_for(source="archive", path=str(bad)), paths)
    assert {f: sha256_file(paths.raw / f) for f in raw_files(paths)} == before
    assert leftovers(paths) == []


def test_failure_mid_extraction_leaves_no_raw(
    tmp_path: Path, kaggle_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception after some files were written (here: while writing the manifest)."""
    import alzstage.data.download as download

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(download, "build_manifest", broken)
    paths = Paths(tmp_path / "proj")
    with pytest.raises(OSError, match="disk full"):
        run_download(params_for(source="folder", path=str(kaggle_tree)), paths)
    assert not paths.raw.exists()
    assert leftovers(paths) == []


# --------------------------------------------------------------------------- http(s)


def test_http_archive_is_cached_by_sha256(
    tmp_path: Path, kaggle_tree: Path, http_server: LocalServer
) -> None:
    archive = make_zip(kaggle_tree, http_server.root / "alz.zip")
    params = params_for(
        source="archive", path=f"{http_server.url}/alz.zip", sha256=sha256_file(archive)
    )
    paths = Paths(tmp_path / "proj")
    run_download(params, paths)
    assert_kaggle_layout(paths)
    run_download(params, paths)
    assert http_server.requests["/alz.zip"] == 1
    assert_kaggle_layout(paths)


def test_http_sha256_mismatch_keeps_nothing(
    tmp_path: Path, kaggle_tree: Path, http_server: LocalServer
) -> None:
    make_zip(kaggle_tree, http_server.root / "alz.zip")
    paths = Paths(tmp_path / "proj")
    params = params_for(source="archive", path=f"{http_server.url}/alz.zip", sha256="a" * 64)
    with pytest.raises(AlzstageError, match="sha256 mismatch"):
        run_download(params, paths)
    assert list((paths.cache / "downloads").iterdir()) == []
    assert not paths.raw.exists()


def test_http_404_is_not_retried(tmp_path: Path, http_server: LocalServer) -> None:
    params = params_for(source="archive", path=f"{http_server.url}/missing.zip")
    with pytest.raises(AlzstageError, match=r"data\.path: .*missing\.zip: HTTP 404"):
        run_download(params, Paths(tmp_path / "proj"))
    assert http_server.requests["/missing.zip"] == 1


def test_unsupported_scheme(tmp_path: Path) -> None:
    with pytest.raises(AlzstageError, match=r"data\.path: unsupported URL scheme 'ftp'"):
        run_download(
            params_for(source="archive", path="ftp://example.org/a.zip"), Paths(tmp_path / "proj")
        )


# --------------------------------------------------------------------------- kaggle


@pytest.fixture
def no_kaggle_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    return home


def test_kaggle_without_credentials_says_what_to_set(tmp_path: Path, no_kaggle_env: Path) -> None:
    paths = Paths(tmp_path / "proj")
    with pytest.raises(AlzstageError, match=r"KAGGLE_USERNAME and KAGGLE_KEY.*kaggle\.json"):
        run_download(params_for(source="kaggle"), paths)
    assert not paths.raw.exists()


def test_kaggle_credentials_sources(no_kaggle_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert kaggle_credentials() is None
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    assert kaggle_credentials() is None  # a username alone is not a login
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    assert kaggle_credentials() == "KAGGLE_USERNAME/KAGGLE_KEY"
    monkeypatch.delenv("KAGGLE_KEY")
    (no_kaggle_env / ".kaggle").mkdir()
    (no_kaggle_env / ".kaggle" / "kaggle.json").write_text('{"username": "me", "key": "k"}')
    assert kaggle_credentials() == str(no_kaggle_env / ".kaggle" / "kaggle.json")


def fake_kagglehub(monkeypatch: pytest.MonkeyPatch, download) -> list[str]:
    calls: list[str] = []

    def dataset_download(handle: str, *args: object, **kwargs: object) -> str:
        calls.append(handle)
        return download(handle)

    monkeypatch.setitem(
        sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=dataset_download)
    )
    return calls


def test_kaggle_happy_path(
    tmp_path: Path, kaggle_tree: Path, no_kaggle_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    calls = fake_kagglehub(monkeypatch, lambda handle: str(kaggle_tree))
    paths = Paths(tmp_path / "proj")
    run_download(params_for(source="kaggle", kaggle_dataset="someone/data/versions/2"), paths)
    assert calls == ["someone/data/versions/2"]
    assert_kaggle_layout(paths)
    assert (kaggle_tree / "Alzheimer_s Dataset").exists()  # kagglehub's cache is left alone


def test_kaggle_network_error_is_a_download_error(
    tmp_path: Path, no_kaggle_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token")

    def offline(handle: str) -> str:
        raise ConnectionError("Name or service not known")

    fake_kagglehub(monkeypatch, offline)
    with pytest.raises(AlzstageError, match=r"data\.kaggle_dataset=.*ConnectionError.*network"):
        run_download(params_for(source="kaggle"), Paths(tmp_path / "proj"))


def test_kaggle_without_kagglehub_installed(
    tmp_path: Path, no_kaggle_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token")
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # import raises ImportError
    with pytest.raises(AlzstageError, match=r"pip install 'alzstage\[kaggle\]'"):
        run_download(params_for(source="kaggle"), Paths(tmp_path / "proj"))


# --------------------------------------------------------------------------- hugging face

HF_NAMES = ["Mild_Demented", "Moderate_Demented", "Non_Demented", "Very_Mild_Demented"]
TRAIN_FILE = "train-00000-of-00001-abc.parquet"
TEST_FILE = "test-00000-of-00001-def.parquet"


def _jpeg_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _value(label_id: int) -> int:
    """Pixel value that encodes the label id, so the tests can check which id a file had."""
    return min(30 + 60 * label_id, 255)


def write_hf_parquet(target: Path, labels: list[int], names: list[str] | None) -> Path:
    """A parquet file shaped like a ``datasets`` export: image struct + int label."""
    images = [{"bytes": _jpeg_bytes(_value(i)), "path": f"{k}.jpg"} for k, i in enumerate(labels)]
    table = pa.table(
        {
            "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "label": pa.array(labels, pa.int64()),
        }
    )
    if names is not None:
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata(
            {"huggingface": json.dumps({"info": {"features": features}})}
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, target)
    return target


def serve_hf(
    server: LocalServer,
    revision: str,
    files: dict[str, list[int]],
    names: list[str] | None = HF_NAMES,
) -> dict[str, str]:
    folder = server.root / "datasets" / "Falah" / "Alzheimer_MRI" / "resolve" / revision / "data"
    return {f: sha256_file(write_hf_parquet(folder / f, ids, names)) for f, ids in files.items()}


def hf_params(server: LocalServer, files: dict[str, str | None], **extra: object) -> Params:
    return params_for(
        source="huggingface", hf_endpoint=server.url, hf_revision="abc123", hf_files=files, **extra
    )


def assert_labels_by_name(paths: Paths) -> pd.DataFrame:
    manifest = read_raw_manifest(paths.raw_manifest)
    by_name = {"MildDemented": 0, "ModerateDemented": 1, "NonDemented": 2, "VeryMildDemented": 3}
    for row in manifest.itertuples():
        pixels = np.asarray(Image.open(paths.raw / row.path))
        assert abs(float(pixels.mean()) - _value(by_name[row.label])) < 3, row.path
    return manifest


def test_huggingface_parquet_lands_with_labels_by_name(
    tmp_path: Path, http_server: LocalServer
) -> None:
    train_ids, test_ids = [0, 1, 2, 3, 2, 2, 3], [2, 0]
    digests = serve_hf(http_server, "abc123", {TRAIN_FILE: train_ids, TEST_FILE: test_ids})
    paths = Paths(tmp_path / "proj")
    result = run_download(hf_params(http_server, digests), paths)
    manifest = assert_labels_by_name(paths)
    assert len(manifest) == 9 and result.metrics["n_NonDemented"] == 4.0
    assert manifest.groupby("source_split").size().to_dict() == {"test": 2, "train": 7}
    assert "images/train/NonDemented/train-00000_00002.jpg" in manifest["path"].tolist()
    assert (manifest["format"] == "JPEG").all()
    # pinned files are not fetched again
    run_download(hf_params(http_server, digests), paths)
    prefix = "/datasets/Falah/Alzheimer_MRI/resolve/abc123/data/"
    assert http_server.requests[prefix + TRAIN_FILE] == 1
    assert http_server.requests[prefix + TEST_FILE] == 1


def test_huggingface_without_metadata_uses_the_params_table(
    tmp_path: Path, http_server: LocalServer
) -> None:
    serve_hf(http_server, "abc123", {TRAIN_FILE: [0, 1, 2, 3]}, names=None)
    paths = Paths(tmp_path / "proj")
    with pytest.warns(UserWarning, match=r"not pinned; downloaded sha256 is [0-9a-f]{64}"):
        run_download(hf_params(http_server, {TRAIN_FILE: None}), paths)
    assert_labels_by_name(paths)


def test_huggingface_file_names_win_over_params_table(
    tmp_path: Path, http_server: LocalServer
) -> None:
    """A wrong fallback table is ignored (with a warning) when the file names its labels."""
    digests = serve_hf(http_server, "abc123", {TRAIN_FILE: [0, 1, 2, 3]})
    reordered = ["Non_Demented", "Mild_Demented", "Moderate_Demented", "Very_Mild_Demented"]
    paths = Paths(tmp_path / "proj")
    with pytest.warns(UserWarning, match="differ from data.hf_label_names"):
        run_download(hf_params(http_server, digests, hf_label_names=reordered), paths)
    assert_labels_by_name(paths)


@pytest.mark.parametrize(
    "names, problem",
    [
        (["Demented", "Non_Demented", "Very_Mild_Demented"], r"no class for \['Demented'\]"),
        (
            ["Mild_Demented", "Non_Demented", "Very_Mild_Demented"],
            r"no label for \['ModerateDemented'\]",
        ),
        (
            [
                "Mild_Demented",
                "Mild Demented",
                "Non_Demented",
                "Very_Mild_Demented",
                "Moderate_Demented",
            ],
            r"several labels map to \['MildDemented'\]",
        ),
    ],
)
def test_huggingface_relabelled_revision_is_refused(
    tmp_path: Path, http_server: LocalServer, names: list[str], problem: str
) -> None:
    digests = serve_hf(http_server, "abc123", {TRAIN_FILE: [0, 1, 2]}, names=names)
    paths = Paths(tmp_path / "proj")
    with pytest.raises(AlzstageError, match=rf"hf_files\['{TRAIN_FILE}'\].*{problem}.*hf_revision"):
        run_download(hf_params(http_server, digests), paths)
    assert not paths.raw.exists()
    assert leftovers(paths) == []


def test_huggingface_label_out_of_range(tmp_path: Path, http_server: LocalServer) -> None:
    digests = serve_hf(http_server, "abc123", {TRAIN_FILE: [0, 7]})
    with pytest.raises(AlzstageError, match=r"row 1 has label 7, not an id in 0\.\.3"):
        run_download(hf_params(http_server, digests), Paths(tmp_path / "proj"))


def test_huggingface_wrong_revision_is_a_clear_404(
    tmp_path: Path, http_server: LocalServer
) -> None:
    serve_hf(http_server, "abc123", {TRAIN_FILE: [0]})
    params = params_for(
        source="huggingface",
        hf_endpoint=http_server.url,
        hf_revision="other",
        hf_files={TRAIN_FILE: None},
    )
    with pytest.raises(AlzstageError, match=r"hf_files\[.*/resolve/other/data/.*HTTP 404"):
        run_download(params, Paths(tmp_path / "proj"))


def test_label_table_maps_by_name_not_position() -> None:
    assert label_table(HF_NAMES, BaseParams(), "x") == [
        "MildDemented",
        "ModerateDemented",
        "NonDemented",
        "VeryMildDemented",
    ]
    adni = BaseParams(classes=["CN", "MCI", "LMCI", "AD"])
    assert label_table(["AD", "cn", "lmci", "mci"], adni, "x") == ["AD", "CN", "LMCI", "MCI"]


def test_huggingface_from_a_local_folder(tmp_path: Path) -> None:
    """Where huggingface.co is unreachable: parquet files copied by hand into data.path."""
    folder = tmp_path / "proj" / "inbox"
    digest = sha256_file(write_hf_parquet(folder / TRAIN_FILE, [0, 1, 2, 3], HF_NAMES))
    paths = Paths(tmp_path / "proj")
    params = params_for(source="huggingface", path="inbox", hf_files={TRAIN_FILE: digest})
    run_download(params, paths)
    assert len(assert_labels_by_name(paths)) == 4
    wrong = params_for(source="huggingface", path="inbox", hf_files={TRAIN_FILE: "0" * 64})
    with pytest.raises(
        AlzstageError, match=rf"sha256 mismatch for data\.hf_files\['{TRAIN_FILE}'\]"
    ):
        run_download(wrong, paths)


@pytest.mark.realdata
def test_real_archive_counts(tmp_path: Path) -> None:
    """Opt-in: ALZSTAGE_REAL_ARCHIVE=/path/to/alzheimers-dataset-4-class-of-images.zip."""
    archive = os.environ.get("ALZSTAGE_REAL_ARCHIVE")
    if not archive:
        pytest.skip("set ALZSTAGE_REAL_ARCHIVE to the Kaggle-layout zip to run this")
    paths = Paths(tmp_path / "proj")
    run_download(params_for(source="archive", path=archive), paths)
    manifest = read_raw_manifest(paths.raw_manifest)
    counts = manifest.groupby(["source_split", "label"]).size().unstack()
    assert counts.loc["train"].to_dict() == {
        "MildDemented": 562,
        "ModerateDemented": 52,
        "NonDemented": 2048,
        "VeryMildDemented": 1436,
    }
    assert counts.loc["test"].to_dict() == {
        "MildDemented": 142,
        "ModerateDemented": 12,
        "NonDemented": 512,
        "VeryMildDemented": 356,
    }
    assert manifest["sha256"].is_unique and manifest["pixel_hash"].is_unique
    shapes = manifest[["width", "height", "mode"]].drop_duplicates().values.tolist()
    assert shapes == [[176, 208, "L"]]
