from gfvm.cli import main

raise SystemExit(main())
