"""Authoring helper: turn a percent-format script (`# %%` code cells, `# %% [markdown]` prose cells) into a notebook.

Usage: python .ci/py2nb.py SRC.py nbs/NN_name.ipynb
Cell ids are derived from the cell text (sha1), so re-running on an unchanged cell keeps its id and diffs stay small.
The notebook, not the script, is the source of truth once written; this is only a convenient way to write one.
"""
import hashlib, sys
import nbformat

def parse(text):
    cells, kind, buf = [], None, []
    def flush():
        if kind is None: return
        while buf and not buf[-1].strip(): buf.pop()
        while buf and not buf[0].strip(): buf.pop(0)
        if kind == 'markdown':
            src = '\n'.join(l[2:] if l.startswith('# ') else l[1:] if l.startswith('#') else l for l in buf)
        else: src = '\n'.join(buf)
        if src.strip(): cells.append((kind, src))
    for line in text.splitlines():
        if line.startswith('# %%'):
            flush(); buf = []
            kind = 'markdown' if '[markdown]' in line or '[md]' in line else 'code'
        else: buf.append(line)
    flush()
    return cells

def build(cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
    seen = {}
    for kind, src in cells:
        h = hashlib.sha1(src.encode()).hexdigest()[:8]
        n = seen.get(h, 0); seen[h] = n + 1
        cid = h if n == 0 else f'{h}-{n}'
        c = nbformat.v4.new_markdown_cell(src) if kind == 'markdown' else nbformat.v4.new_code_cell(src)
        c.id = cid
        nb.cells.append(c)
    return nb

if __name__ == '__main__':
    src, dst = sys.argv[1], sys.argv[2]
    nb = build(parse(open(src, encoding='utf-8').read()))
    nbformat.validate(nb)
    nbformat.write(nb, dst)
    print(f'wrote {dst}: {len(nb.cells)} cells')
