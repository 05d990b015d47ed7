"""Files for the RAG tests, made on the spot: PDFs (reportlab) and Word documents (python-docx)."""

from __future__ import annotations

from pathlib import Path


def write_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A PDF with one page per list of lines (reportlab)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path), pagesize=A4)
    for lines in pages:
        y = 800
        for line in lines:
            pdf.drawString(72, y, line)
            y -= 16
        pdf.showPage()
    pdf.save()
    return path


def write_docx(path: Path) -> Path:
    """A Word document with a title, two heading levels, paragraphs and a table."""
    import docx

    document = docx.Document()
    document.add_heading("Operations Manual", level=0)
    document.add_heading("Installation", level=1)
    document.add_paragraph("Unpack the archive into /opt/widget and run the installer.")
    document.add_heading("Ports", level=2)
    document.add_paragraph("The service listens on the ports in this table.")
    table = document.add_table(rows=2, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "http", "8080"
    table.rows[1].cells[0].text, table.rows[1].cells[1].text = "metrics", "9090"
    document.add_heading("Backups", level=1)
    document.add_paragraph("Nightly backups are written to the vault at 02:00.")
    document.save(str(path))
    return path
