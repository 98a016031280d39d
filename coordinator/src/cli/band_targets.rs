//! `--wait-target-band BAND=DURATION`: a priority band's own wait target.

use guildhall_proto::schedule::Band;
use std::collections::BTreeMap;

/// Parses `7-9=2s` entries (empty ones skipped) into targets in ms; the
/// error is one line naming the bad entry.
pub fn parse(entries: &[String]) -> Result<BTreeMap<Band, u64>, String> {
    let mut out = BTreeMap::new();
    for entry in entries.iter().filter(|e| !e.trim().is_empty()) {
        let short: String = entry.chars().take(60).collect();
        let (band, d) = entry.split_once('=').ok_or_else(|| {
            format!("--wait-target-band must be BAND=DURATION, like 7-9=2s (got '{short}')")
        })?;
        let band = Band::from_label(band.trim()).ok_or_else(|| {
            format!(
                "--wait-target-band: unknown priority band '{}': use 0-3, 4-6 or 7-9",
                band.trim().chars().take(20).collect::<String>()
            )
        })?;
        let d = humantime::parse_duration(d.trim())
            .map_err(|e| format!("--wait-target-band {band}: {e} (got '{short}')"))?;
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return Err(format!(
                "--wait-target-band {band}: the target must be more than 0"
            ));
        }
        out.insert(band, ms);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_and_durations_parse_and_nonsense_is_refused() {
        let ok = parse(&["7-9=2s".into(), " 0-3 = 1m ".into(), "".into()]).unwrap();
        assert_eq!(ok.get(&Band::High), Some(&2_000));
        assert_eq!(ok.get(&Band::Low), Some(&60_000));
        for bad in [
            "7-9",
            "5=2s",
            "7-9=",
            "7-9=-1s",
            "7-9=0s",
            "x=1s",
            "7-9=2 parsecs",
        ] {
            let e = parse(&[bad.into()]).unwrap_err();
            assert!(e.starts_with("--wait-target-band"), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}
