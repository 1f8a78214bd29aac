"""Checks the pipeline examples under docs/examples/ (run by scripts/check-examples, which
installs this script's tools and passes --bin):

- a GitHub Actions workflow against the GitHub workflow schema that check-jsonschema ships
  (`--builtin-schema vendor.github-workflows`: vendored, so no network);
- every CloudFormation template with cfn-lint;
- a CodeBuild buildspec (a file, or one inlined as a CodeBuild project's BuildSpec) for its
  structure: version 0.2, only known phases, each phase with `commands`;
- every `pier ...` command in those files (workflow `run:` scripts, buildspec commands,
  and the ```sh blocks of docs/pipelines.md) through the real `pier` binary with
  PIER_PARSE_ONLY=1, which parses with the CLI's own parser and stops.

Prints one line per check and closes with `examples: N passed, N failed`; exits 1 when
anything failed. Before it checks anything it proves the parse check can fail: a known-bad
command line must be refused and a known-good one accepted.
"""

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# Files that must contain pier commands, and the subcommands each must contain at least
# once: a file whose commands the extractor cannot see fails instead of passing vacuously.
EXPECTED = {
    "docs/examples/github-actions/deploy.yml": {"push", "group put", "deploy"},
    "docs/examples/codebuild/buildspec.yml": {"push"},
    "docs/examples/codepipeline/pipeline.yml": {"deploy"},
    "docs/pipelines.md": {"group put", "deploy", "history"},
}

BUILDSPEC_KEYS = {"version", "run-as", "env", "proxy", "batch", "phases", "reports",
                  "artifacts", "cache"}
BUILDSPEC_PHASES = {"install", "pre_build", "build", "post_build"}
PHASE_KEYS = {"run-as", "on-failure", "runtime-versions", "commands", "finally"}

# What stands in for a value only known when the pipeline runs: GitHub expressions
# (${{ ... }}), CodePipeline variables (#{...}), shell and CloudFormation !Sub variables
# (${NAME}, ${AWS::Region}, ${Bucket.Arn}, $NAME, $1), and command substitutions. "1" is
# accepted by every pier flag that takes a string or a number.
PLACEHOLDER = "1"
GITHUB_EXPR = re.compile(r"\$\{\{.*?\}\}")
PIPELINE_VAR = re.compile(r"#\{[A-Za-z0-9_.]+\}")
BRACED_VAR = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_:.]*\}")
PLAIN_VAR = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!])")
COMMAND_SUB = re.compile(r"\$\(([^()]*)\)|`([^`]*)`")
# A file descriptor written against its redirection (2>&1, 1>out): not an argument.
FD_REDIRECT = re.compile(r"(?<![^\s])\d+(?=[<>])")
STARTS_WITH_PIER = re.compile(r"^\s*(?:\S*/)?pier(?:\s|$)")
# Words that may come before the command itself.
PREFIX_WORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "time", "exec",
                "command", "sudo", "{", "}"}
OPERATOR_CHARS = set("();<>|&")


class CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, !If, ...) read as plain values."""


def _untagged(loader, _suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_mapping(node, deep=True)


CfnLoader.add_multi_constructor("!", _untagged)


class Results:
    """Every check's outcome, printed as it is made."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def ok(self, what):
        self.passed += 1
        print(f"ok    {what}")

    def fail(self, what, why):
        self.failed += 1
        print(f"FAIL  {what}")
        for line in why.rstrip().splitlines():
            print(f"      {line}")

    def check(self, good, what, why=""):
        if good:
            self.ok(what)
        else:
            self.fail(what, why)


# ---- finding pier commands --------------------------------------------------------------

def shell_commands(script):
    """The `pier` invocations in a shell script, each as its argument list (without `pier`).

    Joins continued lines, replaces pipeline-time values by a placeholder, takes commands
    out of `$(...)` and backquotes, then splits each line into simple commands at shell
    operators and keeps those whose command word is `pier` (or a path ending in /pier).
    Raises ValueError for a line that cannot be tokenised (an unclosed quote).
    """
    text = script.replace("\\\n", " ")
    text = GITHUB_EXPR.sub(PLACEHOLDER, text)
    text = PIPELINE_VAR.sub(PLACEHOLDER, text)
    found = []
    inner = []

    def substitute(m):
        body = m.group(1) if m.group(1) is not None else m.group(2)
        if STARTS_WITH_PIER.match(body):
            inner.append(body)
        return PLACEHOLDER

    while True:
        text, n = COMMAND_SUB.subn(substitute, text)
        if n == 0:
            break
    text = BRACED_VAR.sub(PLACEHOLDER, text)
    text = PLAIN_VAR.sub(PLACEHOLDER, text)
    inner = [PLAIN_VAR.sub(PLACEHOLDER, BRACED_VAR.sub(PLACEHOLDER, b)) for b in inner]
    for line in text.splitlines() + inner:
        line = FD_REDIRECT.sub("", line)
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens = list(lex)
        for words in split_commands(tokens):
            while words and (words[0] in PREFIX_WORDS or re.match(r"^[A-Za-z_]\w*=", words[0])):
                words = words[1:]
            if words and (words[0] == "pier" or words[0].endswith("/pier")):
                found.append(words[1:])
    return found


def split_commands(tokens):
    """Simple commands of a token list: cut at ; && || | & ( ), with a redirection and its
    target dropped from the command it belongs to."""
    commands, current = [], []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t and set(t) <= OPERATOR_CHARS:
            if t[0] in "<>" or t in ("&>", "&>>"):
                i += 2  # the redirection and its target
                continue
            commands.append(current)
            current = []
        else:
            current.append(t)
        i += 1
    commands.append(current)
    return [c for c in commands if c]


def buildspec_scripts(spec, where):
    """(where, command) of every command of a buildspec's phases."""
    out = []
    phases = spec.get("phases") if isinstance(spec, dict) else None
    if not isinstance(phases, dict):
        return out
    for name, phase in phases.items():
        if not isinstance(phase, dict):
            continue
        for key in ("commands", "finally"):
            for i, cmd in enumerate(phase.get(key) or []):
                if isinstance(cmd, str):
                    out.append((f"{where}phases.{name}.{key}[{i}]", cmd))
    return out


def workflow_scripts(doc):
    """(where, script) of every `run:` of a GitHub Actions workflow."""
    out = []
    for job_name, job in (doc.get("jobs") or {}).items():
        for i, step in enumerate((job or {}).get("steps") or []):
            if isinstance(step, dict) and isinstance(step.get("run"), str):
                out.append((f"jobs.{job_name}.steps[{i}].run", step["run"]))
    return out


def inline_buildspecs(node, path=""):
    """(where, parsed buildspec) of every CodeBuild BuildSpec written inline in a template."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key == "BuildSpec" and isinstance(value, str) and "\n" in value:
                out.append((here, yaml.safe_load(value)))
            else:
                out.extend(inline_buildspecs(value, here))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.extend(inline_buildspecs(value, f"{path}[{i}]"))
    return out


def markdown_scripts(text):
    """(where, script) of every ```sh block of a Markdown file."""
    out = []
    for m in re.finditer(r"^([ \t]*)```(?:sh|bash)\n(.*?)^[ \t]*```", text, re.M | re.S):
        line = text[: m.start()].count("\n") + 1
        # A block inside a list item is indented; the shell sees it without the indent.
        indent = m.group(1)
        body = "\n".join(l.removeprefix(indent) for l in m.group(2).splitlines())
        out.append((f"line {line}", body))
    return out


# ---- checks -----------------------------------------------------------------------------

def kind_of(doc):
    if not isinstance(doc, dict):
        return "other"
    if "AWSTemplateFormatVersion" in doc or "Resources" in doc:
        return "cloudformation"
    # YAML 1.1 reads the workflow's `on:` key as True.
    if "jobs" in doc and ("on" in doc or True in doc):
        return "workflow"
    if "phases" in doc and "version" in doc:
        return "buildspec"
    return "other"


def buildspec_problems(spec):
    """What is wrong with a buildspec's structure (empty when nothing)."""
    if not isinstance(spec, dict):
        return ["not a mapping"]
    problems = []
    if str(spec.get("version")) != "0.2":
        problems.append(f"version must be 0.2, not {spec.get('version')!r}")
    for key in spec:
        if key not in BUILDSPEC_KEYS:
            problems.append(f"unknown top-level key {key!r}")
    phases = spec.get("phases")
    if not isinstance(phases, dict) or not phases:
        return problems + ["phases must be a non-empty mapping"]
    for name, phase in phases.items():
        if name not in BUILDSPEC_PHASES:
            problems.append(f"unknown phase {name!r} (known: {', '.join(sorted(BUILDSPEC_PHASES))})")
            continue
        if not isinstance(phase, dict):
            problems.append(f"phases.{name} must be a mapping")
            continue
        for key in phase:
            if key not in PHASE_KEYS:
                problems.append(f"phases.{name}: unknown key {key!r}")
        cmds = phase.get("commands")
        if not isinstance(cmds, list) or not cmds or not all(isinstance(c, str) for c in cmds):
            problems.append(f"phases.{name}.commands must be a non-empty list of strings")
    return problems


def parse_only(pier, args, cwd):
    """Runs `pier ARGS` with PIER_PARSE_ONLY=1 and nothing else of this environment (no
    PIER_* or AWS_* variable fills a flag in). Returns (exit code, stdout, stderr)."""
    env = {"PIER_PARSE_ONLY": "1", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([pier, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=30, check=False)
    return p.returncode, p.stdout.strip(), p.stderr.strip()


def run_tool(argv):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    return p.returncode, (p.stdout + p.stderr).strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="the pier binary")
    ap.add_argument("--root", required=True, help="the repository")
    opts = ap.parse_args()
    root = Path(opts.root).resolve()
    pier = str(Path(opts.bin).resolve())
    tools = Path(sys.executable).parent
    results = Results()
    work = tempfile.mkdtemp(prefix="pier-check-examples.")

    # The parse check must be able to fail, and the binary must have the parse-only mode
    # (an older one would run the examples' commands for real).
    code, out, err = parse_only(pier, ["deploy", "--no-such-flag"], work)
    results.check(code != 0 and not out, "self-test: `pier deploy --no-such-flag` is refused",
                  f"exit {code}, stdout {out!r}, stderr {err!r}")
    code, out, err = parse_only(pier, ["status", "d-AB12CD34E", "--status-dir", "/nonexistent"], work)
    results.check(code == 0 and out == "parsed: status",
                  "self-test: a good command line is parsed and not run",
                  f"exit {code}, stdout {out!r}, stderr {err!r}\n"
                  "(is this a pier binary with PIER_PARSE_ONLY? build it: "
                  "cargo build -p pier-controller --bin pier)")
    if results.failed:
        return finish(results)

    files = sorted((root / "docs/examples").rglob("*.yml")) + sorted((root / "docs/examples").rglob("*.yaml"))
    files += [root / "docs/pipelines.md"]
    parsed_by_file = {}
    for path in files:
        rel = str(path.relative_to(root))
        if not path.exists():
            results.fail(rel, "missing")
            continue
        text = path.read_text()
        scripts = []
        if path.suffix == ".md":
            scripts = markdown_scripts(text)
        else:
            try:
                doc = yaml.load(text, Loader=CfnLoader)
            except yaml.YAMLError as e:
                results.fail(f"{rel}: YAML", str(e))
                continue
            kind = kind_of(doc)
            if kind == "workflow":
                code, out = run_tool([str(tools / "check-jsonschema"), "--builtin-schema",
                                      "vendor.github-workflows", str(path)])
                results.check(code == 0, f"{rel}: GitHub workflow schema", out)
                scripts = workflow_scripts(doc)
            elif kind == "cloudformation":
                code, out = run_tool([str(tools / "cfn-lint"), "--", str(path)])
                results.check(code == 0, f"{rel}: cfn-lint", out)
                for where, spec in inline_buildspecs(doc):
                    problems = buildspec_problems(spec)
                    results.check(not problems, f"{rel}: {where}: buildspec structure",
                                  "\n".join(problems))
                    scripts += buildspec_scripts(spec, f"{where}: ")
            elif kind == "buildspec":
                problems = buildspec_problems(doc)
                results.check(not problems, f"{rel}: buildspec structure", "\n".join(problems))
                scripts = buildspec_scripts(doc, "")

        subcommands = []
        for where, script in scripts:
            try:
                invocations = shell_commands(script)
            except ValueError as e:
                results.fail(f"{rel}: {where}", f"cannot split into words: {e}")
                continue
            for args in invocations:
                shown = " ".join(shlex.quote(a) for a in ["pier", *args])
                code, out, err = parse_only(pier, args, work)
                # `pier --version` (or --help) prints what clap prints, not `parsed:`.
                informational = args in (["--version"], ["-V"], ["--help"], ["-h"])
                good = code == 0 and (out.startswith("parsed: ") or informational)
                results.check(good, f"{rel}: {where}: {shown}", f"exit {code}\n{err or out}")
                if good and not informational:
                    subcommands.append(out.removeprefix("parsed: "))
        parsed_by_file[rel] = subcommands

    # No vacuous pass: each file that should hold pier commands yields the ones it should.
    for rel, wanted in sorted(EXPECTED.items()):
        got = parsed_by_file.get(rel)
        if got is None:
            results.fail(f"{rel}: pier commands", "file not checked (missing or unreadable)")
            continue
        missing = sorted(wanted - set(got))
        results.check(not missing, f"{rel}: has its pier commands ({', '.join(sorted(wanted))})",
                      f"found {len(got)} pier command(s) ({', '.join(got) or 'none'}); "
                      f"none for: {', '.join(missing)}")
    return finish(results)


def finish(results):
    print(f"examples: {results.passed} passed, {results.failed} failed")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
