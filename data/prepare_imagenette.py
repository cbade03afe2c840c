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

URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz"
HERE = os.path.dirname(os.path.abspath(__file__))


def extract(archive, root):
    """Unpack imagenette2-320/{train,val}/<wnid>/*.JPEG into root/{train,val} (atomic rename)."""
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # 'data' refuses absolute paths and links out of tmp
    except (OSError, EOFError, tarfile.TarError) as e:  # no such file; not a tar archive; cut short
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not a whole tar archive"
        raise SystemExit(f"error: cannot extract '{archive}' ({reason}): give imagenette2-320.tgz") from None
    top = [d for d in os.listdir(tmp) if os.path.isdir(os.path.join(tmp, d, "train"))]
    if not top:
        raise SystemExit(f"error: '{archive}' has no <dir>/train folder: is it imagenette2-320.tgz?")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(os.path.join(tmp, top[0]), root)
    shutil.rmtree(tmp, ignore_errors=True)
    return root


if __name__ == "__main__":
    from common import CheckpointError, apply_overrides, download
    args = apply_overrides(dict(root=os.path.join(HERE, "imagenette"), archive=""), sys.argv[1:])
    root, archive = args["root"], args["archive"]
    if os.path.exists(root) and not os.path.isdir(root):
        raise SystemExit(f"error: --root={root} is a file, not a folder: give a folder to extract into")
    if not archive:
        try:
            archive = download(URL, cache_dir=os.path.join(HERE, "downloads"),
                               instead="give its path with --archive=")
        except CheckpointError as e:
            raise SystemExit(f"error: {e}")
    print(f"wrote {extract(archive, root)}")
