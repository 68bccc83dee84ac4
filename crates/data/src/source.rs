//! Where a dataset's rows are: a recipe's `dataset_name` (or a mixture entry's `id`) resolved to
//! files, split by split, as `datasets.load_dataset` resolves them — a local data file, a local
//! folder whose splits come from its README `configs:` block or from file and folder names, or a
//! dataset in the Hugging Face hub cache (`datasets--org--name/snapshots/<refs/main>`), offline.
//!
//! Split inference follows `datasets` 5.2's `data_files.py`: first the sharded layout
//! `data/{split}-00000-of-00001.*`, then split keywords in folder names, then in file names
//! (`train`/`training`, `validation`/`valid`/`dev`/`val`, `test`/`testing`/`eval`/`evaluation`),
//! else every file is `train`; patterns are fsspec globs, hidden files and `__special__` folders are
//! skipped unless a pattern names them, and the format (JSON or Parquet) is the most common data
//! extension. Split specs take `datasets`' slicing: `train[:10%]`, `train[5:-5]`, `train+test`.

use crate::Error;
use std::path::{Path, PathBuf};

use regex::Regex;
use sha2::{Digest, Sha256};

use pyfiles::HubCache;

/// The two file formats nibble reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.json` (a list of rows, or one row per line) and `.jsonl` / `.ndjson`.
    Json,
    /// `.parquet`.
    Parquet,
}

/// A dataset's files, split by split.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetFiles {
    /// The id as the recipe names it.
    pub id: String,
    /// The file or folder named (a hub-cache snapshot for a hub id; a config's `data_dir` is
    /// below it).
    pub root: PathBuf,
    /// The format of every file.
    pub format: Format,
    /// Split names and their files, in `datasets`' order (patterns in order, files sorted).
    pub splits: Vec<Split>,
}

/// One split and its files.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// The split name.
    pub name: String,
    /// Its files in reading order (a file matched by two patterns is read twice, as `datasets` does).
    pub files: Vec<PathBuf>,
    /// The patterns that chose them, relative to the dataset folder.
    pub patterns: Vec<String>,
}

impl DatasetFiles {
    /// The split's files; a missing split or one without files is an error naming the folder.
    pub fn split(&self, name: &str) -> Result<&Split, Error> {
        let split = self.splits.iter().find(|s| s.name == name).ok_or_else(|| Error::NoSplit {
            id: self.id.clone(),
            split: name.to_owned(),
            root: self.root.clone(),
            available: self.splits.iter().map(|s| s.name.clone()).collect(),
        })?;
        if split.files.is_empty() {
            return Err(Error::SplitWithoutFiles {
                id: self.id.clone(),
                split: name.to_owned(),
                root: self.root.clone(),
                patterns: split.patterns.clone(),
            });
        }
        Ok(split)
    }
}

// --- globs ---------------------------------------------------------------------------------------

/// A glob has magic when it holds `*`, `?` or `[` (Python's `glob.has_magic`).
pub fn has_magic(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

fn push_escaped(out: &mut String, c: char) {
    out.push_str(&format!("\\x{{{:X}}}", c as u32));
}

/// One path component of a glob (no `/`) as a regex: `*` any run of non-`/`, `?` one non-`/`,
/// `[...]` / `[!...]` a class (fnmatch's rules: a leading `]` is literal, `a-z` a range, an
/// unclosed `[` literal).
fn translate_component(part: &str, out: &mut String) {
    let chars: Vec<char> = part.chars().collect();
    let n = chars.len();
    let mut i = 0;
    let mut last_star = false;
    while i < n {
        let c = chars[i];
        i += 1;
        match c {
            '*' => {
                if !last_star {
                    out.push_str("[^/]*");
                }
                last_star = true;
                continue;
            }
            '?' => out.push_str("[^/]"),
            '[' => {
                let mut j = i;
                if j < n && chars[j] == '!' {
                    j += 1;
                }
                if j < n && chars[j] == ']' {
                    j += 1;
                }
                while j < n && chars[j] != ']' {
                    j += 1;
                }
                if j >= n {
                    out.push_str("\\[");
                } else {
                    let stuff = &chars[i..j];
                    i = j + 1;
                    let (negate, body) = match stuff.first() {
                        Some('!') => (true, &stuff[1..]),
                        _ => (false, stuff),
                    };
                    let mut class = String::new();
                    let mut k = 0;
                    while k < body.len() {
                        if k + 2 < body.len() && body[k + 1] == '-' {
                            let (lo, hi) = (body[k], body[k + 2]);
                            if lo <= hi {
                                push_escaped(&mut class, lo);
                                class.push('-');
                                push_escaped(&mut class, hi);
                            }
                            k += 3;
                        } else {
                            push_escaped(&mut class, body[k]);
                            k += 1;
                        }
                    }
                    match (negate, class.is_empty()) {
                        (false, true) => out.push_str("(?:[^\\x{0}-\\x{10FFFF}])"),
                        (true, true) => out.push('.'),
                        (false, false) => out.push_str(&format!("[{class}]")),
                        (true, false) => out.push_str(&format!("[^{class}]")),
                    }
                }
            }
            c => push_escaped(out, c),
        }
        last_star = false;
    }
}

/// A glob as fsspec (>= 2023.12) matches it against `/`-separated paths: `**` as a whole
/// component is any number of folders, `*` alone one non-empty component.
pub fn glob_regex(pattern: &str) -> Result<Regex, String> {
    let parts: Vec<&str> = pattern.split('/').collect();
    let last = parts.len() - 1;
    let mut re = String::from("^(?s:");
    for (idx, part) in parts.iter().enumerate() {
        match *part {
            "*" => {
                re.push_str(if idx < last { "[^/]+/" } else { "[^/]+" });
                continue;
            }
            "**" => {
                re.push_str(if idx < last { "(?:.+/)?" } else { ".*" });
                continue;
            }
            p if p.contains("**") => {
                return Err(format!(
                    "invalid pattern `{pattern}`: `**` can only be an entire path component"
                ));
            }
            p => translate_component(p, &mut re),
        }
        if idx < last {
            re.push('/');
        }
    }
    re.push_str(")$");
    Regex::new(&re).map_err(|e| format!("invalid pattern `{pattern}`: {e}"))
}

/// Files `datasets` never takes as data unless a pattern names them.
const FILES_TO_IGNORE: &[&str] = &[
    "README.md",
    "config.json",
    "dataset_info.json",
    "dataset_infos.json",
    "dummy_data.zip",
    "dataset_dict.json",
];

/// Every extension `datasets` 5.2 takes as a data file (`_ALL_ALLOWED_EXTENSIONS`).
const ALLOWED_EXTENSIONS: &str = ".csv .tsv .json .jsonl .ndjson .parquet .geoparquet .gpq .arrow .txt .conll \
    .conllu .tar .xml .hdf5 .h5 .eval .toml .md .lance .tsfile .vortex .fa .fasta .fna .ffn .faa .frn .afa .gb \
    .gbk .genbank .fq .fastq .pdb .ent .cif .mmcif .PDB .ENT .blp .bmp .dib .bufr .cur .pcx .dcx .dds .ps .eps \
    .fit .fits .fli .flc .ftc .ftu .gbr .gif .grib .png .apng .jp2 .j2k .jpc .jpf .jpx .j2c .icns .ico .im .iim \
    .tif .tiff .jfif .jpe .jpg .jpeg .mpg .mpeg .msp .pcd .pxr .pbm .pgm .ppm .pnm .psd .bw .rgb .rgba .sgi .ras \
    .tga .icb .vda .vst .webp .wmf .emf .xbm .xpm .BLP .BMP .DIB .BUFR .CUR .PCX .DCX .DDS .PS .EPS .FIT .FITS \
    .FLI .FLC .FTC .FTU .GBR .GIF .GRIB .PNG .APNG .JP2 .J2K .JPC .JPF .JPX .J2C .ICNS .ICO .IM .IIM .TIF .TIFF \
    .JFIF .JPE .JPG .JPEG .MPG .MPEG .MSP .PCD .PXR .PBM .PGM .PPM .PNM .PSD .BW .RGB .RGBA .SGI .RAS .TGA .ICB \
    .VDA .VST .WEBP .WMF .EMF .XBM .XPM .aiff .au .avr .caf .flac .htk .svx .mat4 .mat5 .mpc2k .ogg .paf .pvf \
    .raw .rf64 .sd2 .sds .ircam .voc .w64 .wav .nist .wavex .wve .xi .mp3 .opus .3gp .3g2 .avi .asf .flv .mp4 \
    .mov .m4v .mkv .webm .f4v .wmv .wma .ogm .mxf .nut .AIFF .AU .AVR .CAF .FLAC .HTK .SVX .MAT4 .MAT5 .MPC2K \
    .OGG .PAF .PVF .RAW .RF64 .SD2 .SDS .IRCAM .VOC .W64 .WAV .NIST .WAVEX .WVE .XI .MP3 .OPUS .3GP .3G2 .AVI \
    .ASF .FLV .MP4 .MOV .M4V .MKV .WEBM .F4V .WMV .WMA .OGM .MXF .NUT .glb .gltf .ply .stl .GLB .GLTF .PLY .STL \
    .pdf .PDF .nii .NII .zip .idx .manifest .txn";

/// Extensions that are metadata, not a format (`_ALL_METADATA_EXTENSIONS`).
const METADATA_EXTENSIONS: &[&str] = &[".idx", ".manifest", ".txn"];

/// File names that are metadata of folder-style datasets (`_ALL_METADATA_FILENAMES`).
const METADATA_FILENAMES: &[&str] = &[
    "instruction.md",
    "latest_version_hint.json",
    "metadata.csv",
    "metadata.jsonl",
    "metadata.parquet",
    "task.toml",
];

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The dotted suffixes of a file name (`a.b.jsonl` -> `b`, `jsonl`).
fn suffixes(path: &str) -> impl Iterator<Item = &str> {
    basename(path).split('.').skip(1)
}

fn has_allowed_extension(path: &str) -> bool {
    suffixes(path).any(|s| ALLOWED_EXTENSIONS.split_whitespace().any(|e| &e[1..] == s))
}

fn is_hidden(part: &str) -> bool {
    part.starts_with('.') && !part.chars().all(|c| c == '.')
}

/// fsspec/datasets' filters on a matched path: hidden parts and `__special__` folders count
/// only when the pattern names as many of them.
fn requested(path: &str, pattern: &str) -> bool {
    let parts =
        |s: &str| s.split('/').filter(|p| !p.is_empty() && *p != ".").map(str::to_owned).collect::<Vec<_>>();
    let (pp, gp) = (parts(path), parts(pattern));
    let special =
        |v: &[String]| v[..v.len().saturating_sub(1)].iter().filter(|p| p.starts_with("__")).count();
    let hidden = |v: &[String]| v.iter().filter(|p| is_hidden(p)).count();
    special(&pp) == special(&gp) && hidden(&pp) == hidden(&gp)
}

/// Every file under `dir` (symlinks followed), as sorted `/`-separated relative paths.
pub fn list_files(dir: &Path) -> Result<Vec<String>, Error> {
    fn walk(dir: &Path, rel: &str, depth: usize, out: &mut Vec<String>) -> Result<(), Error> {
        let io = |source| Error::Io { path: dir.to_owned(), source };
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let path = entry.path();
            let rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            // `metadata` follows symlinks (hub-cache snapshots link into blobs/).
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() && depth < 32 => walk(&path, &rel, depth + 1, out)?,
                Ok(m) if m.is_file() => out.push(rel),
                _ => {}
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", 0, &mut out)?;
    out.sort();
    Ok(out)
}

/// `datasets`' `resolve_pattern` over a listing: the files a pattern matches, sorted, without
/// ignored names and unrequested hidden/special paths, and (with `data_only`) only files with a
/// data extension.
fn resolve_pattern(files: &[String], pattern: &str, data_only: bool) -> Result<Vec<String>, String> {
    let pattern = pattern.trim_start_matches("./");
    let re = glob_regex(pattern)?;
    let own_name = basename(pattern);
    Ok(files
        .iter()
        .filter(|f| re.is_match(f))
        .filter(|f| !FILES_TO_IGNORE.iter().any(|i| *i == basename(f) && *i != own_name))
        .filter(|f| requested(f, pattern))
        .filter(|f| !data_only || has_allowed_extension(f))
        .cloned()
        .collect())
}

// --- default split patterns ----------------------------------------------------------------------

const SHARDED: &str = "data/{split}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*";
const SEP: &str = "-._ 0-9";
const DEFAULT_SPLITS: [&str; 3] = ["train", "validation", "test"];
const KEYWORDS: [(&str, &[&str]); 3] = [
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];
const IN_DIR_NAME: [&str; 4] = ["**/{k}/**", "**/{k}[{s}]*/**", "**/*[{s}]{k}/**", "**/*[{s}]{k}[{s}]*/**"];
const IN_FILE_NAME: [&str; 2] = ["**/{k}[{s}]*", "**/*[{s}]{k}[{s}]*"];

fn keyword_patterns(bases: &[&str]) -> Vec<(String, Vec<String>)> {
    KEYWORDS
        .iter()
        .map(|(split, words)| {
            let pats = words
                .iter()
                .flat_map(|k| bases.iter().map(move |b| b.replace("{k}", k).replace("{s}", SEP)))
                .collect();
            (split.to_string(), pats)
        })
        .collect()
}

fn split_name_ok(name: &str) -> bool {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^\w+(\.\w+)*$").expect("valid regex")).is_match(name)
}

/// The split patterns `datasets` infers for a folder's files (`get_data_patterns`): the sharded
/// `data/{split}-NNNNN-of-NNNNN.*` layout, else the first of: `*.eval` logs, harbor tasks, split
/// keywords in folder names, in file names, and last every file as `train`.
pub fn default_patterns(files: &[String]) -> Result<Vec<(String, Vec<String>)>, String> {
    let any = |pattern: &str| resolve_pattern(files, pattern, false).map(|m| !m.is_empty());
    let sharded = resolve_pattern(files, &SHARDED.replace("{split}", "*"), false)?;
    if !sharded.is_empty() {
        let re = Regex::new(r"(?P<split>.+)-[0-9][0-9][0-9][0-9][0-9]*-of-[0-9][0-9][0-9][0-9][0-9]*.*")
            .expect("valid regex");
        let mut splits: Vec<String> = Vec::new();
        for f in &sharded {
            let caps = re.captures(basename(f)).ok_or_else(|| format!("unexpected shard name {f}"))?;
            let s = caps["split"].to_owned();
            if !split_name_ok(&s) {
                return Err(format!("split name should match '^\\w+(\\.\\w+)*$' but got '{s}' (from {f})"));
            }
            if !splits.contains(&s) {
                splits.push(s);
            }
        }
        let mut ordered: Vec<String> =
            DEFAULT_SPLITS.iter().filter(|d| splits.iter().any(|s| s == *d)).map(|s| s.to_string()).collect();
        let mut rest: Vec<String> =
            splits.into_iter().filter(|s| !DEFAULT_SPLITS.contains(&s.as_str())).collect();
        rest.sort();
        ordered.extend(rest);
        return Ok(ordered.into_iter().map(|s| (s.clone(), vec![SHARDED.replace("{split}", &s)])).collect());
    }
    let candidates: Vec<Vec<(String, Vec<String>)>> = vec![
        vec![("logs".into(), vec!["**/*.eval".into()])],
        vec![("test".into(), vec!["**/task.toml".into(), "**/instruction.md".into()])],
        keyword_patterns(&IN_DIR_NAME),
        keyword_patterns(&IN_FILE_NAME),
        vec![("train".into(), vec!["**".into()])],
    ];
    for dict in candidates {
        let mut found = Vec::new();
        for (split, patterns) in dict {
            let mut hit = false;
            for p in &patterns {
                if any(p)? {
                    hit = true;
                    break;
                }
            }
            if hit {
                found.push((split, patterns));
            }
        }
        if !found.is_empty() {
            return Ok(found);
        }
    }
    Ok(Vec::new())
}

// --- README configs ------------------------------------------------------------------------------

/// One entry of a README's `configs:` block.
#[derive(Debug, Clone, PartialEq)]
struct CardConfig {
    name: String,
    /// Split -> patterns; `None` means "infer from `data_dir`".
    data_files: Option<Vec<(String, Vec<String>)>>,
    data_dir: Option<String>,
    default: bool,
}

/// The YAML front matter of a README.md (between the first two `---` lines).
fn front_matter(text: &str) -> Option<&str> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let rest = text.strip_prefix("---")?;
    let rest = rest.strip_prefix("\r\n").or_else(|| rest.strip_prefix('\n'))?;
    let end = rest.find("\n---").map(|i| i + 1).or_else(|| rest.starts_with("---").then_some(0))?;
    Some(&rest[..end])
}

fn strings(v: &serde_json::Value) -> Option<Vec<String>> {
    match v {
        serde_json::Value::String(s) => Some(vec![s.clone()]),
        serde_json::Value::Array(items) => items.iter().map(|i| i.as_str().map(str::to_owned)).collect(),
        _ => None,
    }
}

/// `sanitize_patterns` on a YAML `data_files` value: a string or list of strings is `train`; a list
/// of `{split, path}` maps names each split.
fn card_data_files(v: &serde_json::Value) -> Result<Vec<(String, Vec<String>)>, String> {
    if let Some(list) = strings(v) {
        return Ok(vec![("train".into(), list)]);
    }
    let items =
        v.as_array().ok_or("data_files must be a string, a list of strings or a list of {split, path}")?;
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for item in items {
        let split = item.get("split").and_then(|s| s.as_str());
        let paths = item.get("path").and_then(strings);
        let (Some(split), Some(paths)) = (split, paths) else {
            return Err(format!("data_files entry {item} must be {{split, path}}"));
        };
        if out.iter().any(|(s, _)| s == split) {
            return Err(format!("split `{split}` appears twice in data_files"));
        }
        out.push((split.to_owned(), paths));
    }
    Ok(out)
}

/// The `configs:` block of `dir/README.md`, if any.
fn card_configs(dir: &Path) -> Result<Vec<CardConfig>, Error> {
    let readme = dir.join("README.md");
    let Ok(text) = std::fs::read_to_string(&readme) else { return Ok(Vec::new()) };
    let card_err = |message: String| Error::Card { path: readme.clone(), message };
    let Some(yaml) = front_matter(&text) else { return Ok(Vec::new()) };
    let meta = config::yaml::parse(yaml).map_err(|e| card_err(format!("YAML front matter: {e}")))?;
    let Some(configs) = meta.get("configs") else { return Ok(Vec::new()) };
    let configs = configs.as_array().ok_or_else(|| card_err("`configs` must be a list".into()))?;
    configs
        .iter()
        .map(|c| {
            let name = c
                .get("config_name")
                .and_then(|n| n.as_str())
                .ok_or_else(|| card_err(format!("a config without `config_name`: {c}")))?;
            let data_files = c
                .get("data_files")
                .map(card_data_files)
                .transpose()
                .map_err(|m| card_err(format!("config `{name}`: {m}")))?;
            Ok(CardConfig {
                name: name.to_owned(),
                data_files,
                data_dir: c.get("data_dir").and_then(|d| d.as_str()).map(str::to_owned),
                default: c.get("default").and_then(|d| d.as_bool()).unwrap_or(false),
            })
        })
        .collect()
}

/// `MetadataConfigs.get_default_config_name`: the only config, the one named `default`, or the
/// one marked `default: true`.
fn default_config(configs: &[CardConfig], path: &Path) -> Result<Option<usize>, Error> {
    let mut found = None;
    for (i, c) in configs.iter().enumerate() {
        if configs.len() == 1 || c.name == "default" || c.default {
            if let Some(j) = found {
                let first: &CardConfig = &configs[j];
                return Err(Error::Card {
                    path: path.join("README.md"),
                    message: format!("several default configs: `{}` and `{}`", first.name, c.name),
                });
            }
            found = Some(i);
        }
    }
    Ok(found)
}

// --- formats -------------------------------------------------------------------------------------

fn module_of(ext: &str) -> Option<Result<Format, String>> {
    match ext {
        ".json" | ".jsonl" | ".ndjson" => Some(Ok(Format::Json)),
        ".parquet" | ".geoparquet" | ".gpq" => Some(Ok(Format::Parquet)),
        e if METADATA_EXTENSIONS.contains(&e) => None,
        e if ALLOWED_EXTENSIONS.split_whitespace().any(|a| a == e) => Some(Err(format!("`{e}` data"))),
        _ => None,
    }
}

/// `infer_module_for_data_files_list`: the most common data extension (metadata files last,
/// Parquet first on a tie, then `.jsonl`, `.json`, then by name).
fn infer_format(files: &[String]) -> Option<Result<Format, String>> {
    let mut counts: Vec<((String, bool), usize)> = Vec::new();
    for f in files {
        let meta = METADATA_FILENAMES.contains(&basename(f));
        for s in suffixes(f) {
            let key = (format!(".{}", s.to_lowercase()), meta);
            match counts.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => counts.push((key, 1)),
            }
        }
    }
    let rank = |e: &str| -> [bool; 7] {
        [".parquet", ".lance", ".vortex", ".arrow", ".jsonl", ".json", ".csv"].map(|x| x == e)
    };
    counts.sort_by(|((ea, ma), na), ((eb, mb), nb)| {
        (!mb, nb, rank(eb), eb.as_str()).cmp(&(!ma, na, rank(ea), ea.as_str()))
    });
    counts.into_iter().find_map(|((ext, _), _)| module_of(&ext))
}

fn keeps_format(path: &str, format: Format) -> bool {
    let exts: &[&str] = match format {
        Format::Json => &[".json", ".jsonl", ".ndjson", ".zip"],
        Format::Parquet => &[".parquet", ".geoparquet", ".gpq", ".zip"],
    };
    // `.*(ext)(\..+)?$`: the extension, then at most one more dotted tail.
    exts.iter().any(|e| {
        path.match_indices(e).any(|(i, _)| {
            let rest = &path[i + e.len()..];
            rest.is_empty() || (rest.starts_with('.') && rest.len() > 1)
        })
    })
}

// --- resolving -----------------------------------------------------------------------------------

/// The format of a single data file, by its extension.
pub fn file_format(path: &Path) -> Option<Format> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json" | "jsonl" | "ndjson") => Some(Format::Json),
        Some("parquet") => Some(Format::Parquet),
        _ => None,
    }
}

/// Whether `id` has the shape of a hub dataset id (`name` or `org/name`, a relative path with at
/// most one `/`), as `datasets` decides before asking the hub.
fn looks_like_hub_id(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with(['/', '.', '~'])
        && id.matches('/').count() <= 1
        && id.split('/').all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || "-_.".contains(c)))
}

/// The snapshot folder of a hub dataset: `datasets--org--name/snapshots/<refs/main>`.
pub fn hub_snapshot(id: &str, hub: &HubCache) -> Result<PathBuf, Error> {
    hub.snapshot(pyfiles::RepoKind::Dataset, id, "main").ok_or_else(|| Error::NotInCache {
        id: id.to_owned(),
        split: None,
        searched: hub.repo_folder(pyfiles::RepoKind::Dataset, id),
    })
}

/// The files of every split of a local folder (or a hub snapshot), for `config`.
pub fn resolve_dir(id: &str, dir: &Path, config: Option<&str>) -> Result<DatasetFiles, Error> {
    let configs = card_configs(dir)?;
    let card_err = |message: String| Error::Card { path: dir.to_owned(), message };
    let (base, patterns) = if configs.is_empty() {
        match config {
            None | Some("default") => (dir.to_owned(), None),
            // Not `datasets`: with no README in the cache, a config is the folder of that name
            // (the layout `push_to_hub(config_name=...)` writes).
            Some(c) if dir.join(c).is_dir() => (dir.join(c), None),
            Some(c) => {
                let mut available = vec!["default".to_owned()];
                available.extend(
                    list_dirs(dir)
                        .into_iter()
                        .filter(|d| !d.starts_with('.') && !d.starts_with("__") && d != "data"),
                );
                return Err(Error::NoConfig { id: id.to_owned(), config: c.to_owned(), available });
            }
        }
    } else {
        let names = || configs.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        let chosen = match config {
            Some(c) => configs.iter().position(|k| k.name == c).ok_or_else(|| Error::NoConfig {
                id: id.to_owned(),
                config: c.to_owned(),
                available: names(),
            })?,
            None => default_config(&configs, dir)?
                .ok_or_else(|| Error::ConfigMissing { id: id.to_owned(), available: names() })?,
        };
        let c = &configs[chosen];
        let base = match &c.data_dir {
            Some(d) => dir.join(d),
            None => dir.to_owned(),
        };
        (base, c.data_files.clone())
    };
    let files = list_files(&base)?;
    let patterns = match patterns {
        Some(p) => p,
        None => default_patterns(&files).map_err(card_err)?,
    };
    if patterns.is_empty() {
        return Err(Error::Empty { id: id.to_owned(), root: base, patterns: Vec::new() });
    }
    let mut splits = Vec::new();
    for (name, pats) in patterns {
        let mut matched = Vec::new();
        for p in &pats {
            if p.contains("://") || Path::new(p).is_absolute() {
                return Err(card_err(format!(
                    "data_files pattern `{p}`: only paths inside the dataset folder"
                )));
            }
            let m = resolve_pattern(&files, p, true).map_err(card_err)?;
            matched.extend(m);
        }
        splits.push((name, pats, matched));
    }
    let all: Vec<String> = splits.iter().flat_map(|(_, _, m)| m.iter().cloned()).collect();
    let mut format = None;
    for (_, _, m) in &splits {
        match infer_format(m) {
            None => {}
            Some(Err(what)) => {
                return Err(Error::Unsupported { id: id.to_owned(), what, path: Some(base) });
            }
            Some(Ok(f)) if format.is_some_and(|g| g != f) => {
                return Err(Error::Unsupported {
                    id: id.to_owned(),
                    what: "splits in different formats".into(),
                    path: Some(base),
                });
            }
            Some(Ok(f)) => format = Some(f),
        }
    }
    let Some(format) = format else {
        return Err(if all.is_empty() {
            let patterns = splits.iter().flat_map(|(_, p, _)| p.iter().cloned()).collect();
            Error::Empty { id: id.to_owned(), root: base, patterns }
        } else {
            Error::Unsupported {
                id: id.to_owned(),
                what: "no JSON or Parquet files".into(),
                path: Some(base),
            }
        });
    };
    let splits = splits
        .into_iter()
        .map(|(name, patterns, m)| Split {
            name,
            files: m.into_iter().filter(|f| keeps_format(f, format)).map(|f| base.join(f)).collect(),
            patterns,
        })
        .collect();
    Ok(DatasetFiles { id: id.to_owned(), root: dir.to_owned(), format, splits })
}

fn list_dirs(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    out.sort();
    out
}

/// Resolve a recipe's dataset id (and config) to its splits' files: a local data file (one split,
/// `train`), a local folder, or a hub dataset in the cache. Nothing is downloaded.
pub fn resolve_dataset(id: &str, config: Option<&str>, hub: &HubCache) -> Result<DatasetFiles, Error> {
    let path = Path::new(id);
    if path.is_file() {
        let format = file_format(path).ok_or_else(|| Error::Unsupported {
            id: id.to_owned(),
            what: format!(
                "a `.{}` file",
                path.extension().and_then(|e| e.to_str()).unwrap_or("(no extension)")
            ),
            path: Some(path.to_owned()),
        })?;
        let split =
            Split { name: "train".into(), files: vec![path.to_owned()], patterns: vec![id.to_owned()] };
        return Ok(DatasetFiles { id: id.to_owned(), root: path.to_owned(), format, splits: vec![split] });
    }
    if path.is_dir() {
        return resolve_dir(id, path, config);
    }
    if !looks_like_hub_id(id) {
        return Err(Error::NoSuchPath { id: id.to_owned(), path: path.to_owned() });
    }
    let snap = hub_snapshot(id, hub)?;
    resolve_dir(id, &snap, config)
}

/// SHA-256 of a file's bytes, read in chunks.
pub fn file_digest(path: &Path) -> Result<[u8; 32], Error> {
    use std::io::Read;
    let io = |source| Error::Io { path: path.to_owned(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

// --- split specs ---------------------------------------------------------------------------------

/// One term of a split spec: `name`, `name[from:to]` (rows or percents), with its rounding.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitSlice {
    /// The split.
    pub split: String,
    /// Start boundary (negative counts from the end).
    pub from: Option<i64>,
    /// End boundary (negative counts from the end).
    pub to: Option<i64>,
    /// Boundaries are percents.
    pub percent: bool,
    /// `pct1_dropremainder` rounding instead of `closest`.
    pub drop_remainder: bool,
}

/// Parse a `datasets` split spec: terms joined by `+`, each `name[from:to]` with optional `%`
/// units (one `%` makes both boundaries percents) and a `(closest)` / `(pct1_dropremainder)`
/// rounding.
pub fn parse_split_spec(spec: &str) -> Result<Vec<SplitSlice>, Error> {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(
            r"^(?P<split>\w+(?:\.\w+)*)(?:\[(?:(?P<from>-?[\d_]+)(?P<from_pct>%)?)?:(?:(?P<to>-?[\d_]+)(?P<to_pct>%)?)?\])?(?:\((?P<rounding>[^)]*)\))?$",
        )
        .expect("valid regex")
    });
    let err = |message: String| Error::SplitSpec { spec: spec.to_owned(), message };
    let sep = Regex::new(r"\s*\+\s*").expect("valid regex");
    sep.split(spec)
        .map(|term| {
            let c =
                re.captures(term).ok_or_else(|| err(format!("unrecognized instruction format `{term}`")))?;
            let int = |name: &str| -> Result<Option<i64>, Error> {
                c.name(name)
                    .map(|m| m.as_str().replace('_', "").parse::<i64>().map_err(|e| err(e.to_string())))
                    .transpose()
            };
            let percent = c.name("from_pct").is_some() || c.name("to_pct").is_some();
            let (from, to) = (int("from")?, int("to")?);
            let drop_remainder = match c.name("rounding").map(|m| m.as_str()) {
                None => false,
                Some(_) if !percent => return Err(err("rounding only applies to percent slices".into())),
                Some("closest") => false,
                Some("pct1_dropremainder") => true,
                Some(r) => {
                    return Err(err(format!("rounding must be closest or pct1_dropremainder, not `{r}`")));
                }
            };
            if percent && [from, to].iter().flatten().any(|b| b.abs() > 100) {
                return Err(err("percent slice boundaries must be > -100 and < 100".into()));
            }
            Ok(SplitSlice { split: c["split"].to_owned(), from, to, percent, drop_remainder })
        })
        .collect()
}

impl SplitSlice {
    /// The row range this slice takes from a split of `n` rows (`_rel_to_abs_instr`).
    pub fn range(&self, n: usize) -> Result<std::ops::Range<usize>, String> {
        let n_i = n as i64;
        let pct = |b: i64| -> Result<i64, String> {
            if self.drop_remainder {
                if n < 100 {
                    return Err(
                        "pct1_dropremainder rounding on a split of fewer than 100 rows is always empty"
                            .into(),
                    );
                }
                Ok(b * (n_i / 100))
            } else {
                // Python's round(): half to even.
                Ok((b as f64 * n as f64 / 100.0).round_ties_even() as i64)
            }
        };
        let (mut from, mut to) = if self.percent {
            (self.from.map(pct).transpose()?.unwrap_or(0), self.to.map(pct).transpose()?.unwrap_or(n_i))
        } else {
            (self.from.unwrap_or(0), self.to.unwrap_or(n_i))
        };
        if from < 0 {
            from = (n_i + from).max(0);
        }
        if to < 0 {
            to = (n_i + to).max(0);
        }
        let (from, to) = (from.min(n_i) as usize, to.min(n_i) as usize);
        Ok(from..to.max(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn globs_follow_fsspec() {
        let m = |p: &str, s: &str| glob_regex(p).expect("pattern").is_match(s);
        assert!(m("**/train[-._ 0-9]*", "train.jsonl"));
        assert!(m("**/train[-._ 0-9]*", "a/b/train-00.parquet"));
        assert!(!m("**/train[-._ 0-9]*", "trainer.jsonl"));
        assert!(!m("**/train[-._ 0-9]*", "train/x.jsonl"));
        assert!(m("**/train/**", "data/train/x/y.jsonl"));
        assert!(m("**/*[-._ 0-9]train[-._ 0-9]*", "my_train.jsonl"));
        assert!(m("data/*", "data/x"));
        assert!(!m("data/*", "data/x/y"));
        assert!(m("**", "a/b/c"));
        assert!(m("a?c", "abc") && !m("a?c", "a/c"));
        assert!(m("[!a]x", "bx") && !m("[!a]x", "ax"));
        assert!(m("x[", "x[") && m("[]]", "]"));
        assert!(glob_regex("a**b").is_err());
    }

    #[test]
    fn split_names_come_from_file_and_folder_names() {
        let p = default_patterns(&files(&[
            "data/train-00000-of-00002.parquet",
            "data/zeta-00000-of-00001.parquet",
            "data/test-00000-of-00001.parquet",
            "data/alpha-00000-of-00001.parquet",
        ]))
        .expect("ok");
        let names: Vec<&str> = p.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(names, ["train", "test", "alpha", "zeta"]);
        let p = default_patterns(&files(&["dev/a.jsonl", "training/b.jsonl"])).expect("ok");
        assert_eq!(p.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), ["train", "validation"]);
        let p = default_patterns(&files(&["my-eval.jsonl", "the_train.jsonl", "README.md"])).expect("ok");
        assert_eq!(p.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), ["train", "test"]);
        let p = default_patterns(&files(&["rows.jsonl", "x/y.parquet"])).expect("ok");
        assert_eq!(p, vec![("train".to_owned(), vec!["**".to_owned()])]);
        assert!(default_patterns(&files(&["data/bad-name-00000-of-00001.parquet"])).is_err());
        assert!(default_patterns(&[]).expect("ok").is_empty());
    }

    #[test]
    fn hidden_and_special_paths_need_asking_for() {
        let f = files(&[".hidden.jsonl", "__pycache__/x.jsonl", "a.jsonl", "README.md", ".git/config.json"]);
        assert_eq!(resolve_pattern(&f, "**", true).expect("ok"), ["a.jsonl"]);
        assert_eq!(resolve_pattern(&f, ".*", true).expect("ok"), [".hidden.jsonl"]);
        assert_eq!(resolve_pattern(&f, "__pycache__/*", true).expect("ok"), ["__pycache__/x.jsonl"]);
        assert_eq!(resolve_pattern(&f, "README.md", true).expect("ok"), ["README.md"]);
    }

    #[test]
    fn format_is_the_most_common_extension() {
        assert_eq!(infer_format(&files(&["a.jsonl", "b.jsonl", "c.parquet"])), Some(Ok(Format::Json)));
        assert_eq!(infer_format(&files(&["a.jsonl", "c.parquet"])), Some(Ok(Format::Parquet)));
        assert_eq!(infer_format(&files(&["a.json", "c.jsonl"])), Some(Ok(Format::Json)));
        assert!(matches!(infer_format(&files(&["a.csv"])), Some(Err(_))));
        assert_eq!(infer_format(&files(&["metadata.jsonl", "x.parquet"])), Some(Ok(Format::Parquet)));
        assert_eq!(infer_format(&[]), None);
        assert!(keeps_format("a/x.json.gz", Format::Json) && keeps_format("x.jsonl", Format::Json));
        assert!(!keeps_format("x.jsonld", Format::Json) && !keeps_format("x.parquet", Format::Json));
    }

    #[test]
    fn readme_front_matter() {
        assert_eq!(front_matter("---\na: 1\n---\n# x"), Some("a: 1\n"));
        assert_eq!(front_matter("# no yaml"), None);
        let v = config::yaml::parse("- split: train\n  path: [a/*, b/*]\n- split: test\n  path: t.jsonl")
            .expect("yaml");
        assert_eq!(
            card_data_files(&v).expect("ok"),
            vec![("train".into(), vec!["a/*".into(), "b/*".into()]), ("test".into(), vec!["t.jsonl".into()])]
        );
        let v = config::yaml::parse("x.jsonl").expect("yaml");
        assert_eq!(card_data_files(&v).expect("ok"), vec![("train".into(), vec!["x.jsonl".into()])]);
    }

    #[test]
    fn split_specs_slice_as_datasets_does() {
        let r = |spec: &str, n: usize| -> Vec<(String, std::ops::Range<usize>)> {
            parse_split_spec(spec)
                .expect("parses")
                .into_iter()
                .map(|s| (s.split.clone(), s.range(n).expect("applies")))
                .collect()
        };
        assert_eq!(r("train", 10), [("train".into(), 0..10)]);
        assert_eq!(r("train[2:7]", 10), [("train".into(), 2..7)]);
        assert_eq!(r("train[-3:]", 10), [("train".into(), 7..10)]);
        assert_eq!(r("train[:-30]", 10), [("train".into(), 0..0)]);
        // One `%` makes both boundaries percents; Python rounds half to even.
        assert_eq!(r("train[10%:-2]", 23), [("train".into(), 2..2)]);
        assert_eq!(r("train[:25%]", 10), [("train".into(), 0..2)]);
        assert_eq!(r("train[:35%]", 10), [("train".into(), 0..4)]);
        assert_eq!(r("a[:1_0] + b", 20), [("a".into(), 0..10), ("b".into(), 0..20)]);
        assert_eq!(r("train[:1%](pct1_dropremainder)", 250), [("train".into(), 0..2)]);
        assert!(parse_split_spec("train[:101%]").is_err());
        assert!(parse_split_spec("train[1:2](closest)").is_err());
        assert!(parse_split_spec("train[").is_err());
        assert!(parse_split_spec("a-b").is_err());
    }

    #[test]
    fn hub_ids_and_paths() {
        assert!(looks_like_hub_id("HuggingFaceH4/ultrachat_200k"));
        assert!(looks_like_hub_id("imdb"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("./data"));
        assert!(!looks_like_hub_id("/abs/path"));
    }
}
