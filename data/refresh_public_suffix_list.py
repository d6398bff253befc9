"""Refresh data/public_suffix_list.dat, the Public Suffix List that dkim.py reads (DMARC).

By default the list is fetched from https://publicsuffix.org/list/public_suffix_list.dat,
the one place its maintainers ask it to be fetched from. Where only the Python package
index can be reached, --from-pypi takes it from the `publicsuffixlist` package instead
(`pip download --no-deps publicsuffixlist`, then the .dat file inside the wheel). The new
file must look like the list (its licence header, the ICANN section, over 5000 rules)
before it replaces the old one, atomically.

Run: python3 data/refresh_public_suffix_list.py [--from-pypi]
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

URL = "https://publicsuffix.org/list/public_suffix_list.dat"
TARGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "public_suffix_list.dat")
MAX_SIZE = 4 << 20
MIN_RULES = 5000


def from_web():
    with urllib.request.urlopen(URL, timeout=60) as response:
        return response.read(MAX_SIZE + 1)


def from_pypi():
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", folder,
                        "publicsuffixlist"], check=True)
        wheel = glob.glob(os.path.join(folder, "publicsuffixlist-*.whl"))[0]
        with zipfile.ZipFile(wheel) as archive:
            return archive.read("publicsuffixlist/public_suffix_list.dat")


def check(data):
    text = data.decode("utf-8")
    rules = [line for line in text.splitlines() if line.strip() and not line.startswith("//")]
    if (len(data) > MAX_SIZE or "===BEGIN ICANN DOMAINS===" not in text
            or "Mozilla Public" not in text or len(rules) < MIN_RULES):
        raise ValueError("this does not look like the Public Suffix List")
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description="Refresh the Public Suffix List copy.")
    parser.add_argument("--from-pypi", action="store_true",
                        help="take the list from the publicsuffixlist package on PyPI")
    args = parser.parse_args(argv)
    try:
        data = from_pypi() if args.from_pypi else from_web()
        check(data)
    except (OSError, ValueError, subprocess.CalledProcessError, KeyError, IndexError) as exc:
        print("refresh_public_suffix_list: %s" % exc, file=sys.stderr)
        return 1
    temporary = TARGET + ".tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, TARGET)
    version = [line for line in data.decode().splitlines() if line.startswith("// VERSION:")]
    print("%s: %s" % (TARGET, version[0] if version else "written"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
