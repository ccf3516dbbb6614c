//! Aligned text tables, like `kubectl get`: a header and rows of cells, each column as wide as
//! its widest cell, three spaces apart, the last column left ragged.

use std::fmt::Write as _;

/// Lays out `header` and `rows` (each row as many cells as the header), columns three spaces
/// apart.
pub fn render<R: AsRef<[String]>>(header: &[&str], rows: &[R]) -> String {
    render_spaced(header, rows, 3)
}

/// [`render`] with columns `gap` spaces apart. Lines carry no trailing spaces.
pub fn render_spaced<R: AsRef<[String]>>(header: &[&str], rows: &[R], gap: usize) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row.as_ref()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            let _ = write!(text, "{cell:<width$}{:gap$}", "");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.as_ref().iter().map(String::as_str));
    }
    out
}

/// `text` cut to `chars` characters, with `…` when it was longer.
pub fn excerpt(text: &str, chars: usize) -> String {
    let mut cut: String = text.chars().take(chars).collect();
    if text.chars().count() > chars {
        cut.push('…');
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let rows = [
            ["a".to_owned(), "é-long".to_owned(), "x".to_owned()],
            ["bbbb".to_owned(), "c".to_owned(), "last".to_owned()],
        ];
        assert_eq!(
            render(&["ID", "NAME", "END"], &rows),
            "ID     NAME     END\na      é-long   x\nbbbb   c        last\n"
        );
        let none: [Vec<String>; 0] = [];
        assert_eq!(render_spaced(&["ONLY"], &none, 2), "ONLY\n");
        let empty_last = [vec!["a".to_owned(), String::new()]];
        assert_eq!(render_spaced(&["A", "B"], &empty_last, 2), "A  B\na\n");
    }

    #[test]
    fn excerpts_cut_on_characters() {
        assert_eq!(excerpt("short", 10), "short");
        assert_eq!(excerpt("ééééé", 3), "ééé…");
    }
}
