"""Publish one export version into a model base path without a server ever seeing half of it.

    python -m serving.publish exports/caption/3 /models/caption             # a local folder
    python -m serving.publish exports/caption/3 gs://bucket/exports/caption  # an object store
    python -m serving.publish exports/caption/3 /models/caption --kubectl    # the cluster volume
    (launch/publish_model.sh is the same command)

The version is the source folder's name (or `--version N`); an existing version is never
overwritten. Before anything is written the source is checked the way TensorFlow Serving loads
it: `saved_model.pb`, `variables/` and the model card (`assets.extra/model_card.json`, which
every export writes: an export without one is refused) present, loaded in a Session (saver
restore op, init op) and every warm-up record replayed (`--skip_check` skips the load and the
replay, not the model card).

How each destination is written (TensorFlow Serving takes only integer folder names as versions,
so a name such as `.publish-3-x1y2` is ignored while it is written):
- local folder: copied into `<dest>/.publish-<v>-<random>/`, then renamed to `<dest>/<v>` with
  one rename(2), atomic on one filesystem: the version appears complete or not at all.
- object store (gs://, s3://, any tf.io.gfile URL): there is no rename (a "rename" is a copy),
  so the files are uploaded under `<dest>/.publish-<v>-<random>/`, then copied server-side to
  `<dest>/<v>/` with `saved_model.pb` LAST, and the temporary prefix is deleted. The version's
  prefix exists during that copy: a server polling then may try it and fail for want of
  `saved_model.pb` (TensorFlow Serving retries a failed load 60 s later, 5 times by default);
  a load that finds `saved_model.pb` finds every other file.
- `--kubectl`: `kubectl cp` into `<dest>/.publish-<v>-<random>/` inside the pod of
  k8s/serving/tools (which mounts the caption-models volume), then one `mv` there through
  `kubectl exec`: the same rename as a local folder, on the volume the servers read.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess

from serving import cli, contract

SAVED_MODEL = "saved_model.pb"


class PublishError(cli.CommandError):
    """A publish that cannot go ahead, as one line saying what to do."""


def check_export(path: str, load: bool = True) -> int:
    """Checks that `path` is an export version folder and, with `load`, that it loads through a
    Session as TensorFlow Serving's SavedModelBundle does and replays its warm-up records;
    returns the number replayed (0 without `load`)."""
    for needed in (SAVED_MODEL, os.path.join("variables", "variables.index")):
        if not os.path.exists(os.path.join(path, needed)):
            raise PublishError(f"{path} is not an export version folder: it has no {needed}; "
                               "pass a folder such as exports/caption/3")
    card = os.path.join(path, contract.MODEL_CARD_FILE)
    try:
        with open(card) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        why = "it has none" if isinstance(e, FileNotFoundError) else f"it is unreadable ({e})"
        raise PublishError(f"{path} has no model card ({contract.MODEL_CARD_FILE}: {why}); "
                           "re-export it with python -m dist_caption.export, which writes one"
                           ) from None
    if not load:
        return 0
    from serving.local_server import loading

    servable = None
    try:
        servable = loading.Servable(0, loading.SavedModelBundle(path))
        return loading.replay_warmup(servable.predict, path)
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's to fix
        code, message = loading.load_failure(path, e)
        raise PublishError(f"{path} fails to load as TensorFlow Serving loads it ({code.name}: "
                           f"{message}); fix the export, or pass --skip_check") from None
    finally:
        if servable is not None:
            servable.close()


def version_of(source: str, version: int | None = None) -> int:
    """`version`, or the integer name of the export folder `source`."""
    if version:
        return version
    name = os.path.basename(os.path.normpath(source))
    if not name.isdigit() or int(name) == 0:
        raise PublishError(f"{source} is not named by a version number: pass --version N")
    return int(name)


def staging_name(version: int) -> str:
    """A temporary folder name TensorFlow Serving ignores (not an integer)."""
    return f".publish-{version}-{secrets.token_hex(4)}"


def copy_file(source: str, target: str) -> None:
    """Copies one file (tf.io.gfile, so the target may be on an object store)."""
    import tensorflow as tf

    tf.io.gfile.copy(source, target, overwrite=True)


def _files(folder: str) -> list[str]:
    """Every file under the local `folder`, relative to it, `saved_model.pb` last."""
    found = [os.path.relpath(os.path.join(parent, name), folder)
             for parent, _, names in os.walk(folder) for name in names]
    return sorted(found, key=lambda f: (f == SAVED_MODEL, f))


def publish_local(source: str, dest: str, version: int) -> str:
    """Copies `source` to `<dest>/<version>` through a temporary folder and one rename."""
    final = _version_path(dest, version)
    _refuse_existing(final)
    try:
        os.makedirs(dest, exist_ok=True)
        staging = os.path.join(dest, staging_name(version))
        os.mkdir(staging)
    except OSError as e:
        raise PublishError(f"cannot write in {dest} ({e.strerror}): choose a writable "
                           "destination") from None
    try:
        for rel in _files(source):
            os.makedirs(os.path.dirname(os.path.join(staging, rel)), exist_ok=True)
            copy_file(os.path.join(source, rel), os.path.join(staging, rel))
        os.rename(staging, final)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise PublishError(f"could not copy {source} into {dest} ({e.strerror}); nothing "
                               "was published: free space or choose another destination"
                               ) from None
        raise
    return final


def publish_object_store(source: str, dest: str, version: int) -> str:
    """Uploads `source` under a temporary prefix of `dest`, then copies it to `<dest>/<version>`
    with saved_model.pb last, then deletes the temporary prefix."""
    import tensorflow as tf

    final = _version_path(dest, version)
    _refuse_existing(final)
    staging = f"{dest.rstrip('/')}/{staging_name(version)}"
    files = _files(source)
    written = []
    try:
        for rel in files:
            tf.io.gfile.makedirs(os.path.dirname(f"{staging}/{rel}"))
            copy_file(os.path.join(source, rel), f"{staging}/{rel}")
        for rel in files:  # saved_model.pb is the last of them
            tf.io.gfile.makedirs(os.path.dirname(f"{final}/{rel}"))
            copy_file(f"{staging}/{rel}", f"{final}/{rel}")
            written.append(rel)
    except (tf.errors.OpError, OSError) as e:
        for path in (final, staging) if written else (staging,):
            if tf.io.gfile.exists(path):
                tf.io.gfile.rmtree(path)
        raise PublishError(f"could not copy {source} to {dest} ({e}); nothing was published: "
                           "check the credentials and the bucket, then run again") from None
    tf.io.gfile.rmtree(staging)
    return final


def publish_kubectl(source: str, dest: str, version: int, pod: str, namespace: str,
                    kubectl: str = "kubectl") -> str:
    """`kubectl cp` of `source` into a temporary folder of `dest` inside `pod`, then one `mv`
    to `<dest>/<version>` there; returns the version's path in the pod."""
    final = f"{dest.rstrip('/')}/{version}"
    staging = f"{dest.rstrip('/')}/{staging_name(version)}"
    base = [kubectl, "--namespace", namespace]

    def run(*args: str, what: str, ok: tuple[int, ...] = (0,)) -> int:
        try:
            done = subprocess.run([*base, *args], capture_output=True, text=True)
        except FileNotFoundError:
            raise PublishError(f"{kubectl} is not on PATH: install kubectl or pass "
                               "--kubectl_binary") from None
        if done.returncode not in ok:
            detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise PublishError(f"{what} in pod {namespace}/{pod} failed ({detail}); is it "
                               "running? kubectl apply -k k8s/serving/tools")
        return done.returncode

    def in_pod(script: str, *args: str, what: str, ok: tuple[int, ...] = (0,)) -> int:
        return run("exec", pod, "--", "sh", "-c", script, "sh", *args, what=what, ok=ok)

    if in_pod('test -e "$1"', final, what="looking for the version", ok=(0, 1)) == 0:
        raise PublishError(f"{final} already exists in pod {namespace}/{pod}: versions are never "
                           "overwritten; pass another --version")
    in_pod('mkdir -p "$1"', staging, what="mkdir")
    try:
        # The target does not exist yet, so kubectl cp creates it with the folder's contents.
        run("cp", source, f"{namespace}/{pod}:{staging}/{version}", what="kubectl cp")
        in_pod('test -f "$1/saved_model.pb" || { echo "the copy has no saved_model.pb" >&2; '
               'exit 1; }; test ! -e "$2" || { echo "$2 appeared meanwhile" >&2; exit 1; }; '
               'mv "$1" "$2" && rmdir "$3"', f"{staging}/{version}", final, staging,
               what="the rename")
    except BaseException:
        subprocess.run([*base, "exec", pod, "--", "rm", "-rf", staging], capture_output=True)
        raise
    return final


def publish(source: str, dest: str, version: int | None = None, check: bool = True,
            kubectl: dict | None = None) -> str:
    """Checks `source` (unless not `check`) and publishes it as `<dest>/<version>`; `kubectl`:
    {pod, namespace[, kubectl]} to write into that pod's volume. Returns the version's path."""
    version = version_of(source, version)
    check_export(source, load=False)
    if not kubectl:  # refused before the (slower) load; the kubectl path asks the pod
        _refuse_existing(_version_path(dest, version))
    check_export(source, load=check)
    if kubectl:
        return publish_kubectl(source, dest, version, **kubectl)
    if "://" in dest:
        return publish_object_store(source, dest, version)
    return publish_local(source, dest, version)


def _version_path(dest: str, version: int) -> str:
    return f"{dest.rstrip('/')}/{version}" if "://" in dest else os.path.join(dest, str(version))


def _refuse_existing(final: str) -> None:
    exists = os.path.exists
    if "://" in final:
        import tensorflow as tf

        exists = tf.io.gfile.exists
    if exists(final):
        raise PublishError(f"{final} already exists: versions are never overwritten; pass "
                           "another --version")
