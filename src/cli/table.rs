//! Plain-text tables for the control verbs: columns padded to their widest cell.

/// Renders rows under a header, columns separated by two spaces.
///
/// Cells are [`escape`](super::escape)d: a reason with a newline or an escape sequence
/// cannot forge rows or drive the terminal.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| super::escape(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(c);
            if i + 1 < widths.len() {
                l.push_str(&" ".repeat(widths[i].saturating_sub(c.chars().count())));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in &rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_in_cells_are_escaped() {
        let t = super::render(
            &["ADDRESS", "REASON"],
            &[vec![
                "203.0.113.7".into(),
                "x\n203.0.113.9  block  forged\u{1b}[2J".into(),
            ]],
        );
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(
            t.contains("x\\n203.0.113.9") && t.contains("\\u{1b}[2J"),
            "{t}"
        );
        assert!(!t.contains('\u{1b}'));
    }

    #[test]
    fn pads_columns() {
        let t = super::render(&["A", "LONG"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONG\nxyz  1\n");
    }
}
