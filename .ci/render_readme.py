"""Render nbs/index.ipynb to README.md (nbdev_readme needs quarto, which cannot be installed here).

Usage: python .ci/render_readme.py [OUT]   (default README.md). Markdown cells are copied; code cells and their
text outputs are shown as fenced blocks unless flagged `#| hide`; nbdev directives (`#| ...`) are dropped.
"""
import sys
from pathlib import Path
import nbformat

root = Path(__file__).resolve().parent.parent
nb = nbformat.read(root / 'nbs' / 'index.ipynb', as_version=4)
parts = ['<!-- Generated from nbs/index.ipynb by .ci/render_readme.py: edit the notebook, not this file. -->']
for c in nb.cells:
    lines = c.source.splitlines()
    flags = [l for l in lines if l.startswith('#|')]
    if any(f.split()[1:2] == ['hide'] for f in flags if len(f.split()) > 1) or any(f.replace(' ', '') == '#|hide' for f in flags):
        continue
    if c.cell_type == 'markdown':
        parts.append(c.source.strip())
    elif c.cell_type == 'code':
        code = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
        if code: parts.append(f'```python\n{code}\n```')
        for o in c.get('outputs', []):
            text = o.get('text') or (o.get('data', {}) or {}).get('text/plain')
            if text:
                text = text if isinstance(text, str) else ''.join(text)
                parts.append(f'```\n{text.rstrip()}\n```')
out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / 'README.md'
out.write_text('\n\n'.join(parts) + '\n', encoding='utf-8')
print(f'wrote {out}')
