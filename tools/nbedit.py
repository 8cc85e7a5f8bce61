"""Small nbformat helpers for editing chapters from scripts (keeps cell ids stable; new cells get content-hash ids).

    from tools.nbedit import NB
    nb = NB("nbs/16b_testing.ipynb"); i = nb.find("make_tiny_qwen3(path"); nb.insert(i + 1, "code", "..."); nb.save()
"""
import hashlib, nbformat

class NB:
    def __init__(self, path):
        self.path, self.nb = path, nbformat.read(path, as_version=4)
    @property
    def cells(self): return self.nb.cells
    def find(self, text, start=0):
        "Index of the first cell at or after `start` whose source contains `text`."
        for i in range(start, len(self.cells)):
            if text in self.cells[i].source: return i
        raise KeyError(f"{text!r} not found in {self.path}")
    def _new(self, kind, src):
        c = nbformat.v4.new_code_cell(src) if kind == "code" else nbformat.v4.new_markdown_cell(src)
        base = hashlib.sha1(src.encode()).hexdigest()[:8]
        ids = {x.get("id") for x in self.cells}
        cid, n = base, 0
        while cid in ids: n += 1; cid = f"{base}-{n}"
        c.id = cid
        return c
    def insert(self, i, kind, src):
        self.cells.insert(i, self._new(kind, src)); return i
    def replace(self, i, src): self.cells[i].source = src
    def sub(self, i, old, new, count=1):
        s = self.cells[i].source
        if old not in s: raise KeyError(f"{old!r} not in cell {i} of {self.path}")
        self.cells[i].source = s.replace(old, new, count)
    def delete(self, i): del self.cells[i]
    def save(self):
        nbformat.validate(self.nb); nbformat.write(self.nb, self.path)
