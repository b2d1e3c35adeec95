//! Slurm hostlist expressions (`node[01-03,07],gpu-2`), expanded and
//! compressed by our own parser.

use std::fmt::Write as _;

/// No expression expands to more names than this: a job on more nodes than
/// any machine has is hostile input, not a job.
pub const MAX_HOSTS: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostlistError {
    #[error("unbalanced brackets in hostlist")]
    Unbalanced,
    #[error("bad range {0:?} in hostlist")]
    BadRange(String),
    #[error("bad character {0:?} in hostlist")]
    BadChar(char),
    #[error("hostlist expands to more than {MAX_HOSTS} names")]
    TooMany,
}

/// Expands a hostlist: an empty expression is no nodes (a pending job).
///
/// Several bracket groups in one name (`r[1-2]n[1-3]`) multiply, as Slurm's
/// do. A range's numbers are zero-padded to the width of its lower bound
/// (`[08-10]` gives `08 09 10`).
///
/// # Errors
/// Unbalanced or nested brackets, a range that is not `N` or `N-M` with
/// N ≤ M, a character Slurm does not allow in node names, or more than
/// [`MAX_HOSTS`] names.
pub fn expand(expr: &str) -> Result<Vec<String>, HostlistError> {
    let mut names = Vec::new();
    for item in split_top_level(expr)? {
        if item.is_empty() {
            continue;
        }
        // Every item counts against the cap, plain names included, and
        // the room left never underflows.
        let room = MAX_HOSTS.saturating_sub(names.len());
        if room == 0 {
            return Err(HostlistError::TooMany);
        }
        // Each part is a list of alternatives; the names are their product.
        let mut parts: Vec<Vec<String>> = Vec::new();
        let mut rest = item;
        let mut count: usize = 1;
        while !rest.is_empty() {
            if let Some(inner) = rest.strip_prefix('[') {
                let end = inner.find(']').ok_or(HostlistError::Unbalanced)?;
                let ranges = expand_ranges(&inner[..end], room)?;
                count = count
                    .checked_mul(ranges.len())
                    .filter(|&c| c <= room)
                    .ok_or(HostlistError::TooMany)?;
                parts.push(ranges);
                rest = &inner[end + 1..];
            } else {
                let end = rest.find('[').unwrap_or(rest.len());
                let text = &rest[..end];
                if let Some(bad) = text.chars().find(|&c| !is_name_char(c)) {
                    return Err(if bad == ']' {
                        HostlistError::Unbalanced
                    } else {
                        HostlistError::BadChar(bad)
                    });
                }
                parts.push(vec![text.to_owned()]);
                rest = &rest[end..];
            }
        }
        let mut product = vec![String::new()];
        for part in &parts {
            product = product
                .iter()
                .flat_map(|head| part.iter().map(move |tail| format!("{head}{tail}")))
                .collect();
        }
        names.extend(product);
    }
    Ok(names)
}

/// Writes names back as a hostlist: runs of consecutive numbers that share
/// a prefix and a digit count become `prefix[a-b,c]`. `expand` of the
/// result gives the same names, grouped by prefix in order of appearance.
pub fn compress(names: &[String]) -> String {
    // (prefix, digit count) -> numbers, in order of first appearance.
    let mut groups: Vec<((&str, usize), usize, Vec<u64>)> = Vec::new();
    let mut plain: Vec<(usize, &str)> = Vec::new();
    for (index, name) in names.iter().enumerate() {
        let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let number = name[name.len() - digits..].parse::<u64>().ok();
        match number {
            Some(number) if digits > 0 && digits <= 18 => {
                let key = (&name[..name.len() - digits], digits);
                match groups.iter_mut().find(|(k, _, _)| *k == key) {
                    Some((_, _, numbers)) => numbers.push(number),
                    None => groups.push((key, index, vec![number])),
                }
            }
            _ => plain.push((index, name)),
        }
    }
    let mut out: Vec<(usize, String)> = Vec::new();
    for ((prefix, width), first, mut numbers) in groups {
        numbers.sort_unstable();
        numbers.dedup();
        if numbers.len() == 1 {
            out.push((first, format!("{prefix}{:0width$}", numbers[0])));
            continue;
        }
        let mut text = format!("{prefix}[");
        let mut i = 0;
        while i < numbers.len() {
            let start = numbers[i];
            while i + 1 < numbers.len() && numbers[i + 1] == numbers[i] + 1 {
                i += 1;
            }
            if text.ends_with(|c: char| c.is_ascii_digit()) {
                text.push(',');
            }
            if numbers[i] == start {
                let _ = write!(text, "{start:0width$}");
            } else {
                let _ = write!(text, "{start:0width$}-{:0width$}", numbers[i]);
            }
            i += 1;
        }
        text.push(']');
        out.push((first, text));
    }
    out.extend(
        plain
            .into_iter()
            .map(|(index, name)| (index, name.to_owned())),
    );
    out.sort_by_key(|(index, _)| *index);
    out.into_iter()
        .map(|(_, text)| text)
        .collect::<Vec<_>>()
        .join(",")
}

/// Letters, digits and `-_.`: what Slurm accepts in a NodeName.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Splits at the commas outside brackets.
fn split_top_level(expr: &str) -> Result<Vec<&str>, HostlistError> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in expr.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(HostlistError::Unbalanced),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(HostlistError::Unbalanced),
            ',' if depth == 0 => {
                items.push(&expr[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(HostlistError::Unbalanced);
    }
    items.push(&expr[start..]);
    Ok(items)
}

/// `01-03,07` → `01 02 03 07`, refusing before it would exceed `room`.
fn expand_ranges(ranges: &str, room: usize) -> Result<Vec<String>, HostlistError> {
    let mut out = Vec::new();
    for range in ranges.split(',') {
        let bad = || HostlistError::BadRange(range.chars().take(40).collect());
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let number = |s: &str| {
            if s.is_empty() || s.len() > 18 || !s.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                s.parse::<u64>().ok()
            }
        };
        let (lo_n, hi_n) = (number(lo).ok_or_else(bad)?, number(hi).ok_or_else(bad)?);
        if hi_n < lo_n {
            return Err(bad());
        }
        let span = usize::try_from(hi_n - lo_n).map_err(|_| HostlistError::TooMany)?;
        if span >= room.saturating_sub(out.len()) {
            return Err(HostlistError::TooMany);
        }
        let width = lo.len();
        out.extend((lo_n..=hi_n).map(|n| format!("{n:0width$}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The review's attack: more than MAX_HOSTS plain names before a
    /// bracketed one made the room left underflow, and a release build then
    /// expanded `n[0-99999999999]` without limit (140 KB of body took serve
    /// down). Every item counts against the cap.
    #[test]
    fn plain_names_count_against_the_cap_before_a_range() {
        let mut attack = "a,".repeat(MAX_HOSTS + 10);
        attack.push_str("n[0-99999999999]");
        assert_eq!(expand(&attack), Err(HostlistError::TooMany));
        let mut at_cap = "a,".repeat(MAX_HOSTS - 1);
        at_cap.push_str("n[7]");
        assert_eq!(expand(&at_cap).unwrap().len(), MAX_HOSTS);
        let mut over = "a,".repeat(MAX_HOSTS);
        over.push('b');
        assert_eq!(expand(&over), Err(HostlistError::TooMany));
        let mut range_over = "a,".repeat(MAX_HOSTS - 2);
        range_over.push_str("n[1-3]");
        assert_eq!(expand(&range_over), Err(HostlistError::TooMany));
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ranges_lists_and_plain_names_expand_in_order() {
        assert_eq!(
            expand("node[01-03,07],gpu-2").unwrap(),
            names(&["node01", "node02", "node03", "node07", "gpu-2"])
        );
        assert_eq!(expand("satnode").unwrap(), names(&["satnode"]));
        assert_eq!(expand("").unwrap(), Vec::<String>::new());
        assert_eq!(expand("n[8-10]").unwrap(), names(&["n8", "n9", "n10"]));
        assert_eq!(expand("n[08-10]").unwrap(), names(&["n08", "n09", "n10"]));
    }

    #[test]
    fn several_bracket_groups_multiply() {
        assert_eq!(
            expand("r[1-2]n[1-2].ib").unwrap(),
            names(&["r1n1.ib", "r1n2.ib", "r2n1.ib", "r2n2.ib"])
        );
    }

    #[test]
    fn huge_ranges_are_refused_without_allocating_them() {
        assert_eq!(expand("n[0-999999999999]"), Err(HostlistError::TooMany));
        assert_eq!(
            expand("a[0-999]b[0-999]c[0-999]"),
            Err(HostlistError::TooMany)
        );
        let many = ["n[0-60000]"; 3].join(",");
        assert_eq!(expand(&many), Err(HostlistError::TooMany));
        assert_eq!(expand("n[0-65535]").unwrap().len(), MAX_HOSTS);
        assert_eq!(expand("n[0-65536]"), Err(HostlistError::TooMany));
    }

    #[test]
    fn malformed_expressions_are_errors() {
        for bad in [
            "n[1-2",
            "n]1[",
            "n[[1]]",
            "n[]",
            "n[a-b]",
            "n[3-1]",
            "n[-1]",
            "n[1-]",
            "n[99999999999999999999]",
            "n o",
            "n;rm",
            "nöde",
        ] {
            assert!(expand(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn compress_gives_back_what_expand_reads() {
        for expr in [
            "node[01-03,07],gpu-2",
            "satnode",
            "n[8-9],n10",
            "a,b,c[1-3]",
        ] {
            let expanded = expand(expr).unwrap();
            assert_eq!(compress(&expanded), expr);
        }
        assert_eq!(compress(&[]), "");
        let big = expand("c[0001-4000]").unwrap();
        assert_eq!(compress(&big), "c[0001-4000]");
    }
}
