"""Write the settings reference from the code, so that it cannot drift from it.

Each role's DEFAULTS and HELP are the one source of truth for its settings. This script
writes them into the generated part of docs/configuration.md (between the two marker
lines) and into examples/mailtoolkit.ini, the sample config with every key commented out.

Run:  python3 docs/make_reference.py          (rewrite both files)
      python3 docs/make_reference.py --check  (exit 1 if either is out of date; a test runs it)
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import plumbing  # noqa: E402
import run_all  # noqa: E402

CONFIGURATION = os.path.join(HERE, "configuration.md")
SAMPLE = os.path.join(ROOT, "examples", "mailtoolkit.ini")
BEGIN = "<!-- reference: written by docs/make_reference.py; edit the code, then run it -->"
END = "<!-- end of reference -->"

# (section, the role's settings, its help texts, the keys it lists). A key run_all knows is
# listed once, in [run_all]: from there it reaches every role that has it.
ROLE_NOTES = {
    "run_all": "run_all's own keys: the listeners and the supervisor. Each of them also "
               "reaches every role that has a key of that name.",
    "smtp_in": "The MX listener (and, under the keys of [submission], the submission one).",
    "submission": "Read on top of [smtp_in] by the submission listener; the same keys.",
    "mta": "The router: the queue, local delivery, bounces.",
    "smtp_out": "Outbound delivery.",
    "pop3d": "The POP3 server.",
}


def sections():
    """[(section, [(key, default, help)])] in the order of the sample file."""
    result = [("run_all", [(key, default, help_text(run_all.HELP, key))
                           for key, default in run_all.DEFAULTS.items()])]
    for name, (file_name, section, defaults) in run_all.CHILDREN.items():
        if name == "submission":
            result.append(("submission", []))
            continue
        module = sys.modules[file_name[:-3]]
        helps = getattr(module, "HELP", {})
        keys = [(key, default, help_text(helps, key)) for key, default in defaults.items()
                if key not in run_all.DEFAULTS and key not in run_all.MANAGED_KEYS]
        result.append((section, keys))
    return result


def help_text(helps, key):
    return helps.get(key) or plumbing.SHARED_HELP.get(key) or key.replace("_", " ")


def default_text(default):
    text = plumbing.config_text(default)
    return text if text != "" else "(empty)"


def markdown():
    lines = [BEGIN, ""]
    for section, keys in sections():
        lines += ["### [%s]" % section, "", ROLE_NOTES[section], ""]
        if not keys:
            continue
        lines += ["| key | flag | default | meaning |", "| --- | --- | --- | --- |"]
        for key, default, text in keys:
            lines.append("| `%s` | `--%s` | `%s` | %s |" % (
                key, key.replace("_", "-"), default_text(default), text.replace("|", "\\|")))
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def sample():
    lines = ["# mailtoolkit.ini - one configuration for every role: python3 run_all.py --config FILE",
             "#",
             "# Every key is shown with its default, commented out. [DEFAULT] and [run_all] reach",
             "# every role that has the key; a role's own section wins over them; run_all's flags",
             "# win over the file. A key no role knows is an error (python3 run_all.py --check).",
             "# After an edit: kill -HUP the run_all process (systemctl reload mailtoolkit).",
             "# The reference: docs/configuration.md.",
             "",
             "[DEFAULT]",
             "# Any key of any section below may stand here too.",
             ""]
    for section, keys in sections():
        lines += ["[%s]" % section, "# " + ROLE_NOTES[section]]
        for key, default, text in keys:
            lines.append("# %s" % text)
            lines.append("# %s = %s" % (key, plumbing.config_text(default)))
        lines.append("")
    return "\n".join(lines)


def updated_configuration():
    with open(CONFIGURATION, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit("%s has lost its marker lines" % CONFIGURATION)
    before = text[:text.index(BEGIN)]
    after = text[text.index(END) + len(END) + 1:]
    return before + markdown() + after


def main(argv):
    wanted = {CONFIGURATION: updated_configuration(), SAMPLE: sample()}
    stale = []
    for path, text in wanted.items():
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            stale.append(path)
            if "--check" not in argv:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    if "--check" in argv and stale:
        print("out of date (run python3 docs/make_reference.py): %s" % ", ".join(stale),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
