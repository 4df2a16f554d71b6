"""Makes target/sdk-venv with the pinned Firecracker SDKs from PyPI (once; a stamp file names
what is installed) and prints its python. Several tests may ask at once: a lock serialises them.

Usage: python3 tests/sdk/venv.py REPO
Exit status 0 with the venv's python on stdout; 2 with the reason on stderr when PyPI cannot be
reached or the install fails (a test says so and fails: CI machines have PyPI).
"""

import fcntl
import os
import shutil
import subprocess
import sys

# pyrecracker declares Python >= 3.12 but its code runs on 3.11 (typing.Self and enum.StrEnum,
# both 3.11): installed with --ignore-requires-python where the host's Python is older.
SDKS = ["pyrecracker==0.6.4", "microheart==0.3.0"]


def say(message):
    print(f"sdk venv: {message}", file=sys.stderr)


def main():
    repo = sys.argv[1]
    venv = os.path.join(repo, "target", "sdk-venv")
    python = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, "installed")
    want = " ".join(SDKS)
    os.makedirs(os.path.join(repo, "target"), exist_ok=True)
    with open(os.path.join(repo, "target", "sdk-venv.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(stamp) and open(stamp).read().strip() == want:
            print(python)
            return 0
        say(f"creating {venv} with {want}")
        shutil.rmtree(venv, ignore_errors=True)
        if subprocess.run([sys.executable, "-m", "venv", venv]).returncode != 0:
            if os.geteuid() != 0:
                say("python3 cannot make a venv: install python3-venv")
                return 2
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            apt = ["apt-get", "install", "-y", "-qq", "python3-venv"]
            if subprocess.run(apt, env=env).returncode != 0:
                subprocess.run(["apt-get", "update", "-qq"], env=env)
                if subprocess.run(apt, env=env).returncode != 0:
                    say("cannot install python3-venv")
                    return 2
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
               "--no-cache-dir", "--ignore-requires-python", "--timeout", "30", "--retries", "2", *SDKS]
        if subprocess.run(pip).returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            say(f"pip could not install {want} from PyPI: is PyPI reachable? "
                "(these tests need it; CI machines have it)")
            return 2
        with open(stamp, "w") as f:
            f.write(want + "\n")
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
