"""
Imagenette (10 easy ImageNet classes, 9469 train / 3925 val images, 320 px short side): a real
small dataset in the ImageFolder layout, for users with internet.

    python -m data.prepare_imagenette                       # download + extract to data/imagenette
    python -m data.prepare_imagenette --archive=FILE.tgz    # extract a copy you already have
    python train_md.py --data_dir=data/imagenette --teacher=clip ...
"""
import os
import shutil
import sys
import tarfile
import tempfile

URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz"
HERE = os.path.dirname(os.path.abspath(__file__))
MARKER = ".prepare_imagenette"  # in root: the files an extraction wrote, one per line


def files_under(folder):
    """the files and links under folder, relative to it, the marker left out"""
    found = []
    for d, dirs, files in os.walk(folder):
        links = [x for x in dirs if os.path.islink(os.path.join(d, x))]
        found += [os.path.relpath(os.path.join(d, name), folder) for name in files + links]
    return sorted(set(found) - {MARKER})


def check_root(root):
    """Refuses a root that holds a file this tool did not write: an existing root is replaced
    only where it is empty or an earlier extraction (its marker lists every file under it)."""
    if not os.path.isdir(root):
        return
    marker = os.path.join(root, MARKER)
    written = set(open(marker).read().splitlines()) if os.path.isfile(marker) else set()
    foreign = [f for f in files_under(root) if f not in written]
    if foreign:
        raise SystemExit(f"error: --root={root} is neither empty nor an earlier extraction of this tool (it holds "
                         f"'{foreign[0]}'): give a new or empty folder; nothing was deleted")


def extract(archive, root):
    """Unpack imagenette2-320/{train,val}/<wnid>/*.JPEG into root/{train,val} (atomic rename)
    through a new temporary folder next to root. Deletes nothing this tool did not write."""
    root = os.path.abspath(root)
    check_root(root)  # before the long extraction, and again before the swap
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".", suffix=".tmp", dir=os.path.dirname(root))
    try:
        os.mkdir(os.path.join(tmp, "new"))
        try:
            with tarfile.open(archive) as tar:  # 'data' refuses absolute paths and links out of tmp
                tar.extractall(os.path.join(tmp, "new"), filter="data")
        except (OSError, EOFError, tarfile.TarError) as e:  # no such file; not a tar archive; cut short
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "not a whole tar archive"
            raise SystemExit(f"error: cannot extract '{archive}' ({reason}): give imagenette2-320.tgz") from None
        top = [os.path.join(tmp, "new", d) for d in os.listdir(os.path.join(tmp, "new"))]
        top = [d for d in top if os.path.isdir(os.path.join(d, "train"))]
        if not top:
            raise SystemExit(f"error: '{archive}' has no <dir>/train folder: is it imagenette2-320.tgz?")
        new = top[0]
        with open(os.path.join(new, MARKER), "w") as f:
            f.write("".join(name + "\n" for name in files_under(new)))
        check_root(root)
        if os.path.isdir(root):
            os.replace(root, os.path.join(tmp, "old"))  # empty, or an earlier extraction: deleted below
        os.replace(new, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


if __name__ == "__main__":
    from common import CheckpointError, apply_overrides, download
    args = apply_overrides(dict(root=os.path.join(HERE, "imagenette"), archive="", __doc__=__doc__), sys.argv[1:])
    root, archive = args["root"], args["archive"]
    if os.path.exists(root) and not os.path.isdir(root):
        raise SystemExit(f"error: --root={root} is a file, not a folder: give a folder to extract into")
    check_root(root)  # before any download
    if not archive:
        try:
            archive = download(URL, cache_dir=os.path.join(HERE, "downloads"),
                               instead="give its path with --archive=")
        except CheckpointError as e:
            raise SystemExit(f"error: {e}")
    print(f"wrote {extract(archive, root)}")
