# PicoD's Python context runner (issue 20): one persistent namespace, cells sent as JSON lines on
# stdin. A cell's output goes to the real stdout/stderr as it is printed; after the cell, stderr
# gets the line "<marker> <status>" and stdout "<marker> <status> <JSON>" with the results, the
# error and the execution count. Plain python3 >= 3.8, no IPython.
import ast
import base64
import json
import os
import signal
import sys
import traceback

namespace = {"__name__": "__main__", "__builtins__": __builtins__}
count = 0
results = []


def represent(obj):
    """IPython's display protocol, without IPython: text/plain always, richer forms when offered."""
    out = {"text/plain": repr(obj)}
    for method, mime in (("_repr_html_", "text/html"), ("_repr_json_", "application/json"),
                         ("_repr_markdown_", "text/markdown"), ("_repr_svg_", "image/svg+xml")):
        fn = getattr(obj, method, None)
        if callable(fn):
            try:
                value = fn()
                if value is not None:
                    out[mime] = value
            except Exception:
                pass
    png = getattr(obj, "_repr_png_", None)
    if callable(png):
        try:
            data = png()
            if data:
                out["image/png"] = base64.b64encode(data).decode("ascii")
        except Exception:
            pass
    return out


def display(*objs):
    for obj in objs:
        results.append(represent(obj))


namespace["display"] = display


def figures():
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    import io
    for num in plt.get_fignums():
        buf = io.BytesIO()
        plt.figure(num).savefig(buf, format="png")
        results.append({"text/plain": f"<Figure {num}>",
                        "image/png": base64.b64encode(buf.getvalue()).decode("ascii")})
    plt.close("all")


def run(code):
    global count
    count += 1
    error = None
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(last, "<cell>", "eval"), namespace)
            if value is not None:
                namespace["_"] = value
                results.append(represent(value))
        figures()
    except BaseException as e:  # KeyboardInterrupt included: the context stays
        if isinstance(e, SystemExit):
            pass
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        sys.stderr.write("".join(tb))
        error = {"name": type(e).__name__, "value": str(e), "traceback": tb}
    return error


def main():
    # SIGINT interrupts a cell (KeyboardInterrupt); between cells it is ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin:
        req = json.loads(line)
        results.clear()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            error = run(req["code"])
        except KeyboardInterrupt:
            error = {"name": "KeyboardInterrupt", "value": "", "traceback": []}
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        status = 1 if error else 0
        report = json.dumps({"results": list(results), "error": error, "execution_count": count})
        os.write(2, f"{req['marker']} {status}\n".encode())
        os.write(1, f"{req['marker']} {status} {report}\n".encode())


main()
