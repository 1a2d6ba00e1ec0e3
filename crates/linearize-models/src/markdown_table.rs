//! Markdown tables (GitHub flavour), as reports, model cards, `compare` and the bench commands
//! write them: a header row, an alignment row (`---` left, `---:` right) and one line per row,
//! cells unpadded. comfy-table's and tabled's markdown styles pad every cell to its column's
//! width and write no alignment markers, so numbers would render left-aligned and every line that
//! tests and docs match would change; this writes the compact form they read.
use std::fmt;

/// How a column's cells sit in the rendered table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table built column by column, then row by row; `Display` writes it, each line ending in
/// a newline.
#[derive(Clone, Debug, Default)]
pub struct MarkdownTable {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl MarkdownTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a left-aligned column (text).
    pub fn left(self, name: impl Into<String>) -> Self {
        self.column(name, Align::Left)
    }

    /// Adds a right-aligned column (numbers).
    pub fn right(self, name: impl Into<String>) -> Self {
        self.column(name, Align::Right)
    }

    pub fn column(mut self, name: impl Into<String>, align: Align) -> Self {
        self.columns.push((name.into(), align));
        self
    }

    /// Adds a row, one cell per column. `|` in a cell is escaped and a line break shows as `⏎`,
    /// so any text stays in its cell.
    ///
    /// # Panics
    /// When the row has another number of cells than the table has columns (a bug in the caller).
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let cells: Vec<String> = cells.into_iter().map(Into::into).collect();
        assert_eq!(
            cells.len(),
            self.columns.len(),
            "markdown table row {cells:?} against columns {:?}",
            self.columns
        );
        self.rows.push(cells);
    }
}

fn write_line<'a>(f: &mut fmt::Formatter<'_>, cells: impl Iterator<Item = &'a str>) -> fmt::Result {
    f.write_str("|")?;
    for c in cells {
        if c.is_empty() {
            f.write_str(" |")?;
        } else {
            write!(f, " {} |", c.replace('|', "\\|").replace('\n', "⏎"))?;
        }
    }
    f.write_str("\n")
}

impl fmt::Display for MarkdownTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_line(f, self.columns.iter().map(|(name, _)| name.as_str()))?;
        f.write_str("|")?;
        for (_, align) in &self.columns {
            f.write_str(match align {
                Align::Left => "---|",
                Align::Right => "---:|",
            })?;
        }
        f.write_str("\n")?;
        for row in &self.rows {
            write_line(f, row.iter().map(String::as_str))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_github_markdown_with_alignment_and_escapes() {
        let mut t = MarkdownTable::new()
            .left("name")
            .right("ms")
            .column("note", Align::Left);
        t.row(["a|b", "1.50", ""]);
        t.row(["two\nlines".to_string(), "20".into(), "ok".into()]);
        assert_eq!(
            t.to_string(),
            "| name | ms | note |\n\
             |---|---:|---|\n\
             | a\\|b | 1.50 | |\n\
             | two⏎lines | 20 | ok |\n"
        );
        assert_eq!(
            MarkdownTable::new().right("x").to_string(),
            "| x |\n|---:|\n"
        );
    }

    #[test]
    #[should_panic(expected = "markdown table row")]
    fn refuses_a_row_of_the_wrong_width() {
        MarkdownTable::new().left("a").left("b").row(["only one"]);
    }
}
